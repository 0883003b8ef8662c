//! Pools and routes: which instances serve which calls.
//!
//! The instances of `--backend`, `--control` and `--discover` form the pool `default`, which
//! serves every call no route sends elsewhere; a one-pool gateway needs nothing more. A route
//! (`--route SERVICE=POOL`, or `--route /PATH/PREFIX=POOL`) sends a service, or the methods
//! under a path prefix, to a named pool, whose instances come from `--pool-backend
//! POOL:ID=HOST:PORT` and `--pool-discover POOL:dns:NAME:PORT`. Each pool has its own
//! balancer, health checks (`grpc.health.v1` naming the pool's service, or `--pool-health
//! POOL=SERVICE`) and stats. The longest matching prefix wins.

use std::collections::BTreeMap;
use std::str::FromStr;

use crate::config::{Backend, Discover};
use crate::relay::{DEFAULT_POOL, Route};

/// Longest pool name.
const MAX_POOL_NAME: usize = 32;

fn validate_pool_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_POOL_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a pool name: use 1 to {MAX_POOL_NAME} of a-z, 0-9, - and _"
        ))
    }
}

/// Whether `name` is a fully qualified gRPC service name (`package.Service`).
fn is_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            let mut bytes = part.bytes();
            bytes
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// One `--route SERVICE=POOL` or `--route /PREFIX=POOL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteArg {
    /// The path prefix matched: `/package.Service/` for a service.
    pub prefix: String,
    /// The service, when a whole service is routed.
    pub service: Option<String>,
    /// The pool.
    pub pool: String,
}

impl FromStr for RouteArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (target, pool) = s.rsplit_once('=').ok_or_else(|| {
            format!("{s:?} is not SERVICE=POOL or /PATH/PREFIX=POOL (e.g. shop.v1.Orders=orders)")
        })?;
        validate_pool_name(pool)?;
        let (prefix, service) = if let Some(path) = target.strip_prefix('/') {
            let valid = !path.is_empty()
                && path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
            if !valid {
                return Err(format!(
                    "{target:?} is not a path prefix such as /shop.v1.Orders/Get or /shop."
                ));
            }
            (target.to_owned(), None)
        } else if is_service_name(target) {
            (format!("/{target}/"), Some(target.to_owned()))
        } else {
            return Err(format!(
                "{target:?} is neither a service name (package.Service) nor a path prefix starting with /"
            ));
        };
        Ok(Self {
            prefix,
            service,
            pool: pool.to_owned(),
        })
    }
}

/// Splits `POOL:REST`.
fn pool_and_rest(s: &str, example: &str) -> Result<(String, String), String> {
    let (pool, rest) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} does not start with a pool name and ':' (e.g. {example})"))?;
    validate_pool_name(pool)?;
    if pool == DEFAULT_POOL {
        return Err(format!(
            "pool {DEFAULT_POOL:?} takes its instances from --backend, --control and --discover"
        ));
    }
    Ok((pool.to_owned(), rest.to_owned()))
}

/// One `--pool-backend POOL:ID=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolBackend {
    /// The pool.
    pub pool: String,
    /// The instance.
    pub backend: Backend,
}

impl FromStr for PoolBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (pool, rest) = pool_and_rest(s, "orders:o1=127.0.0.1:5001")?;
        Ok(Self {
            pool,
            backend: rest.parse()?,
        })
    }
}

/// One `--pool-discover POOL:dns:NAME:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDiscover {
    /// The pool.
    pub pool: String,
    /// The DNS name and port.
    pub name: String,
    /// The instances' port.
    pub port: u16,
}

impl FromStr for PoolDiscover {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (pool, rest) = pool_and_rest(s, "orders:dns:orders.internal:5001")?;
        match rest.parse::<Discover>()? {
            Discover::Dns { name, port } => Ok(Self { pool, name, port }),
            Discover::Redis => Err(format!(
                "{s:?}: a pool discovers its instances by DNS only (POOL:dns:NAME:PORT); the Redis registry feeds the default pool"
            )),
        }
    }
}

/// One `--pool-health POOL=SERVICE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolHealth {
    /// The pool.
    pub pool: String,
    /// The service its health checks name ("" for the whole server).
    pub service: String,
}

impl FromStr for PoolHealth {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (pool, service) = s.split_once('=').ok_or_else(|| {
            format!("{s:?} is not POOL=SERVICE (e.g. orders=shop.v1.Orders, or orders= for the whole server)")
        })?;
        validate_pool_name(pool)?;
        if !service.is_empty() && !is_service_name(service) {
            return Err(format!(
                "{service:?} is not a service name (package.Service)"
            ));
        }
        Ok(Self {
            pool: pool.to_owned(),
            service: service.to_owned(),
        })
    }
}

/// A named pool other than the default, as the flags give it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolPlan {
    /// Its name.
    pub name: String,
    /// Its static instances.
    pub backends: Vec<Backend>,
    /// Its DNS names.
    pub dns: Vec<(String, u16)>,
    /// The service its health checks name.
    pub health_service: String,
    /// The services routed to it whole.
    pub services: Vec<String>,
}

/// Every pool and route the flags give: pools in name order (the default pool is not among
/// them: it is index 0 of the gateway's pools, these follow from 1), and the routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The named pools.
    pub pools: Vec<PoolPlan>,
    /// The routes, to indices into the gateway's pools (0 the default).
    pub routes: Vec<Route>,
    /// The services routed to the default pool whole.
    pub default_services: Vec<String>,
}

/// Checks the flags and makes the [`Plan`]: every route names a pool that has instances (or
/// is the default), every pool with instances has a route, no prefix is routed twice.
///
/// # Errors
///
/// A message naming the flag and value at fault.
pub fn plan(
    routes: &[RouteArg],
    backends: &[PoolBackend],
    discover: &[PoolDiscover],
    health: &[PoolHealth],
) -> Result<Plan, String> {
    let mut pools: BTreeMap<String, PoolPlan> = BTreeMap::new();
    for b in backends {
        let pool = pools.entry(b.pool.clone()).or_default();
        if pool.backends.iter().any(|x| x.id == b.backend.id) {
            return Err(format!(
                "--pool-backend: instance id {:?} given twice in pool {:?}",
                b.backend.id, b.pool
            ));
        }
        pool.backends.push(b.backend.clone());
    }
    for d in discover {
        pools
            .entry(d.pool.clone())
            .or_default()
            .dns
            .push((d.name.clone(), d.port));
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    let mut default_services = Vec::new();
    for route in routes {
        if let Some(pool) = seen.insert(&route.prefix, &route.pool) {
            return Err(format!(
                "--route: {:?} is routed twice (to {pool:?} and to {:?})",
                route.prefix, route.pool
            ));
        }
        if route.pool == DEFAULT_POOL {
            default_services.extend(route.service.clone());
            continue;
        }
        let Some(pool) = pools.get_mut(&route.pool) else {
            return Err(format!(
                "--route {}={}: pool {:?} has no instances (give it --pool-backend {}:ID=HOST:PORT or --pool-discover {}:dns:NAME:PORT)",
                route.prefix.trim_matches('/'),
                route.pool,
                route.pool,
                route.pool,
                route.pool
            ));
        };
        pool.services.extend(route.service.clone());
    }
    for (name, pool) in &mut pools {
        if pool.services.is_empty() && !routes.iter().any(|r| &r.pool == name) {
            return Err(format!(
                "pool {name:?} has instances but no --route sends calls to it (e.g. --route package.Service={name})"
            ));
        }
        name.clone_into(&mut pool.name);
        pool.health_service = pool.services.first().cloned().unwrap_or_default();
    }
    for h in health {
        let Some(pool) = pools.get_mut(&h.pool) else {
            return Err(format!("--pool-health: there is no pool {:?}", h.pool));
        };
        pool.health_service.clone_from(&h.service);
    }
    let index: BTreeMap<String, usize> = pools
        .keys()
        .enumerate()
        .map(|(i, name)| (name.clone(), i + 1))
        .collect();
    let routes = routes
        .iter()
        .map(|r| Route {
            prefix: r.prefix.clone(),
            pool: index.get(&r.pool).copied().unwrap_or(0),
        })
        .collect();
    Ok(Plan {
        pools: pools.into_values().collect(),
        routes,
        default_services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: FromStr<Err = String>>(s: &str) -> T {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn routes_pools_and_their_mistakes() {
        let route: RouteArg = parse("shop.v1.Orders=orders");
        assert_eq!(route.prefix, "/shop.v1.Orders/");
        assert_eq!(parse::<RouteArg>("/shop.=orders").prefix, "/shop.");
        for bad in [
            "shop.v1.Orders",
            "=orders",
            "shop..Orders=o",
            "shop.Orders=Orders",
            "/=o",
            "a b=o",
        ] {
            assert!(bad.parse::<RouteArg>().is_err(), "{bad}");
        }
        assert!("default:A=127.0.0.1:1".parse::<PoolBackend>().is_err());
        assert!("orders:redis".parse::<PoolDiscover>().is_err());

        let ok = plan(
            &[
                parse("shop.v1.Orders=orders"),
                parse("/shop.v1.Orders/Admin=admin"),
                parse("dlb.v1.Operations=default"),
            ],
            &[
                parse("orders:o1=127.0.0.1:5001"),
                parse("admin:a1=127.0.0.1:5002"),
            ],
            &[],
            &[],
        )
        .unwrap();
        let names: Vec<&str> = ok.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["admin", "orders"]);
        assert_eq!(ok.pools[1].health_service, "shop.v1.Orders");
        assert_eq!(ok.pools[0].health_service, "");
        assert_eq!(ok.routes[0].pool, 2);
        assert_eq!(ok.routes[1].pool, 1);
        assert_eq!(ok.routes[2].pool, 0);

        let no_instances = plan(&[parse("shop.v1.Orders=orders")], &[], &[], &[]).unwrap_err();
        assert!(
            no_instances.contains("pool \"orders\" has no instances"),
            "{no_instances}"
        );
        let no_route = plan(&[], &[parse("orders:o1=127.0.0.1:5001")], &[], &[]).unwrap_err();
        assert!(no_route.contains("no --route"), "{no_route}");
        let twice = plan(
            &[
                parse("shop.v1.Orders=orders"),
                parse("shop.v1.Orders=default"),
            ],
            &[parse("orders:o1=127.0.0.1:5001")],
            &[],
            &[],
        )
        .unwrap_err();
        assert!(twice.contains("routed twice"), "{twice}");
    }
}
