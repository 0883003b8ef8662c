//! Policies: which identities may call which methods.

use super::{Caller, check_role, spiffe_id};

/// Services every dlb server answers besides its own.
pub(super) const COMMON_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Rules, one per method pattern. A call is allowed when a rule whose pattern matches its
/// method names its caller; anything else is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// `PATTERN = WHO, WHO, ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `/package.Service/Method`, where `*` matches any run of characters; `*` alone matches
    /// every method.
    pub pattern: String,
    pub who: Vec<Who>,
}

/// Who a rule lets call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// `*`: any certificate from the mesh's CA.
    AnyCertificate,
    /// One identity (a role is written as its `spiffe://dlb.local/ROLE`).
    Identity(String),
}

/// A refusal: who, what, and the most specific rule for that method (none when no rule
/// matches it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub caller: Caller,
    pub method: String,
    pub rule: Option<String>,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            caller,
            method,
            rule,
        } = self;
        match rule {
            Some(rule) => write!(
                f,
                "{caller} may not call {method}: the policy's rule {rule:?} does not name it"
            ),
            None => write!(
                f,
                "{caller} may not call {method}: no rule of the policy allows it"
            ),
        }
    }
}

impl Policy {
    /// Reads a policy: one rule per line, `#` starts a comment.
    ///
    /// # Errors
    ///
    /// `SOURCE line N: what is wrong`.
    pub fn parse(text: &str, source: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            rules.push(Rule::parse(line).map_err(|e| format!("{source} line {}: {e}", n + 1))?);
        }
        if rules.is_empty() {
            return Err(format!(
                "{source}: no rules (an empty policy would refuse every call; use --authz-policy off to allow all)"
            ));
        }
        Ok(Self { rules })
    }

    /// Adds a rule.
    pub fn push(&mut self, rule: Rule) {
        self.rules.push(rule);
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether a rule lets any certificate call every method (the gateway's built-in policy):
    /// then no call needs its caller read.
    pub fn allows_everyone(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.pattern == "*" && r.who.contains(&Who::AnyCertificate))
    }

    /// Whether `caller` may call `method` (its path, `/package.Service/Method`).
    ///
    /// # Errors
    ///
    /// The refusal.
    pub fn check(&self, method: &str, caller: &Caller) -> Result<(), Denied> {
        let mut closest: Option<&Rule> = None;
        for rule in &self.rules {
            if !glob(&rule.pattern, method) {
                continue;
            }
            if rule.who.iter().any(|who| who.allows(caller)) {
                return Ok(());
            }
            if closest.is_none_or(|c| specificity(&rule.pattern) > specificity(&c.pattern)) {
                closest = Some(rule);
            }
        }
        Err(Denied {
            caller: caller.clone(),
            method: method.to_owned(),
            rule: closest.map(|r| r.pattern.clone()),
        })
    }

    /// Refuses rules naming a service this server does not serve (a typo would otherwise
    /// silently allow nothing).
    ///
    /// # Errors
    ///
    /// Which rule, and the services there are.
    pub fn check_services(&self, services: &[&str]) -> Result<(), String> {
        for rule in &self.rules {
            let Some(service) = rule
                .pattern
                .strip_prefix('/')
                .and_then(|rest| rest.split('/').next())
            else {
                continue;
            };
            if service.contains('*') {
                continue;
            }
            if !services.contains(&service) && !COMMON_SERVICES.contains(&service) {
                let mut known: Vec<&str> = services.to_vec();
                known.extend(COMMON_SERVICES);
                return Err(format!(
                    "rule {:?}: this server serves no service {service} (it serves {})",
                    rule.pattern,
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }
}

impl Policy {
    /// Refuses rules naming a method that a service whose methods are known here does not
    /// have (dlb's own services, health and reflection): `/dlb.v1.Operations/Revers` would
    /// otherwise silently allow nothing. Rules with a `*` in the method, and services known
    /// only to the instances behind a gateway, are not checked.
    ///
    /// # Errors
    ///
    /// Which rule, and the methods the service has.
    pub fn check_methods(&self, known: &[(String, Vec<String>)]) -> Result<(), String> {
        for rule in &self.rules {
            let Some((service, method)) = rule
                .pattern
                .strip_prefix('/')
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            if method.contains('*') || service.contains('*') {
                continue;
            }
            if let Some((_, methods)) = known.iter().find(|(name, _)| name == service)
                && !methods.iter().any(|m| m == method)
            {
                return Err(format!(
                    "rule {:?}: {service} has no method {method} (it has {})",
                    rule.pattern,
                    methods.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// The services whose methods a policy's rules are checked against, with their methods:
/// dlb's own (from its descriptors), health and reflection.
pub(super) fn known_methods() -> &'static [(String, Vec<String>)] {
    static KNOWN: std::sync::OnceLock<Vec<(String, Vec<String>)>> = std::sync::OnceLock::new();
    KNOWN.get_or_init(|| {
        use prost::Message as _;
        let mut known: Vec<(String, Vec<String>)> = COMMON_METHODS
            .iter()
            .map(|(service, methods)| {
                (
                    (*service).to_owned(),
                    methods.iter().map(|m| (*m).to_owned()).collect(),
                )
            })
            .collect();
        // Built into the binary by build.rs: it always decodes.
        if let Ok(set) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET) {
            for file in &set.file {
                for service in &file.service {
                    known.push((
                        format!("{}.{}", file.package(), service.name()),
                        service.method.iter().map(|m| m.name().to_owned()).collect(),
                    ));
                }
            }
        }
        known
    })
}

/// The methods of [`COMMON_SERVICES`].
const COMMON_METHODS: [(&str, &[&str]); 3] = [
    ("grpc.health.v1.Health", &["Check", "Watch", "List"]),
    (
        "grpc.reflection.v1.ServerReflection",
        &["ServerReflectionInfo"],
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        &["ServerReflectionInfo"],
    ),
];

impl Rule {
    /// `PATTERN=WHO[,WHO...]` (spaces allowed around each part).
    ///
    /// # Errors
    ///
    /// What is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some((pattern, who)) = text.split_once('=') else {
            return Err(format!(
                "{text:?} is not a rule: write METHOD = WHO, WHO (for example /dlb.v1.Control/* = ui, operator)"
            ));
        };
        let pattern = pattern.trim();
        check_pattern(pattern)?;
        let who = who
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(Who::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if who.is_empty() {
            return Err(format!(
                "rule {pattern:?} names nobody (a role, a spiffe:// URI, or * for any certificate)"
            ));
        }
        Ok(Self {
            pattern: pattern.to_owned(),
            who,
        })
    }
}

impl Who {
    fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self::AnyCertificate);
        }
        if let Some(path) = text.strip_prefix("spiffe://") {
            if path.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("{text:?} is not a spiffe:// identity"));
            }
            return Ok(Self::Identity(text.to_owned()));
        }
        check_role(text)?;
        Ok(Self::Identity(spiffe_id(text)))
    }

    fn allows(&self, caller: &Caller) -> bool {
        match (self, caller) {
            (Self::AnyCertificate, _) => true,
            (Self::Identity(id), Caller::Spiffe(caller)) => id == caller,
            (Self::Identity(_), Caller::Anonymous) => false,
        }
    }
}

fn check_pattern(pattern: &str) -> Result<(), String> {
    // `*`, a pattern with a star, or /Service/Method: `/dlb.v1.Control` alone matches nothing.
    let method = pattern
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(service, method)| !service.is_empty() && !method.is_empty());
    let shape = pattern == "*" || (pattern.starts_with('/') && (pattern.contains('*') || method));
    let chars = pattern
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/*-".contains(&b));
    if shape && chars {
        Ok(())
    } else {
        Err(format!(
            "{pattern:?} is not a method pattern: write /package.Service/Method, with * for any characters (/dlb.v1.Control/*), or * for every method"
        ))
    }
}

/// How specific a pattern is: its characters other than `*`.
fn specificity(pattern: &str) -> usize {
    pattern.bytes().filter(|&b| b != b'*').count()
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // The last `*` seen, and where in `text` it started matching.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            // Let the `*` take one more character.
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
pub(super) fn matches(pattern: &str, text: &str) -> bool {
    glob(pattern, text)
}
