//! Just enough DER to read what authorization needs from an X.509 certificate: its issuer and
//! subject names (as encoded) and the URIs among its subject alternative names. The handshake
//! has verified the certificate already; this only reads it, and gives nothing for anything it
//! does not understand.

/// One DER element: its tag byte and contents.
struct Element<'a> {
    tag: u8,
    contents: &'a [u8],
    /// The whole element, tag and length included.
    whole: &'a [u8],
}

const SEQUENCE: u8 = 0x30;
const OCTET_STRING: u8 = 0x04;
const OBJECT_ID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
/// `[0]` constructed: the version of a TBSCertificate.
const VERSION: u8 = 0xA0;
/// `[3]` constructed: the extensions of a TBSCertificate.
const EXTENSIONS: u8 = 0xA3;
/// `[6]` primitive: a GeneralName that is a URI.
const URI_NAME: u8 = 0x86;
/// id-ce-subjectAltName, 2.5.29.17.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1D, 0x11];

/// Takes the next element off `input`.
fn next<'a>(input: &mut &'a [u8]) -> Option<Element<'a>> {
    let all = *input;
    let (&tag, rest) = all.split_first()?;
    if tag & 0x1F == 0x1F {
        // Multi-byte tags appear nowhere a certificate's structure needs.
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7F);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    let header = all.len() - rest.len();
    let (contents, after) = rest.split_at(len);
    *input = after;
    Some(Element {
        tag,
        contents,
        whole: &all[..header + len],
    })
}

/// The TBSCertificate's fields after the version: serial, signature, issuer, validity,
/// subject, subjectPublicKeyInfo, then optional ones.
fn tbs_fields(certificate: &[u8]) -> Option<Vec<Element<'_>>> {
    let mut input = certificate;
    let certificate = next(&mut input).filter(|e| e.tag == SEQUENCE)?;
    let mut input = certificate.contents;
    let tbs = next(&mut input).filter(|e| e.tag == SEQUENCE)?;
    let mut input = tbs.contents;
    let mut fields = Vec::new();
    while !input.is_empty() {
        let field = next(&mut input)?;
        if fields.is_empty() && field.tag == VERSION {
            continue;
        }
        fields.push(field);
    }
    (fields.len() >= 6).then_some(fields)
}

/// The issuer name of a certificate (DER), as encoded.
pub fn issuer(certificate: &[u8]) -> Option<&[u8]> {
    Some(tbs_fields(certificate)?.get(2)?.whole)
}

/// The subject name of a certificate (DER), as encoded.
pub fn subject(certificate: &[u8]) -> Option<&[u8]> {
    Some(tbs_fields(certificate)?.get(4)?.whole)
}

/// The subjectPublicKeyInfo of a certificate (DER), as encoded.
pub fn public_key_info(certificate: &[u8]) -> Option<&[u8]> {
    Some(tbs_fields(certificate)?.get(5)?.whole)
}

/// The URIs among a certificate's (DER) subject alternative names, in order; none when it has
/// none or cannot be read.
pub fn uri_sans(certificate: &[u8]) -> Vec<String> {
    uri_sans_of(certificate).unwrap_or_default()
}

fn uri_sans_of(certificate: &[u8]) -> Option<Vec<String>> {
    let fields = tbs_fields(certificate)?;
    let extensions = fields.iter().find(|f| f.tag == EXTENSIONS)?;
    let mut input = extensions.contents;
    let list = next(&mut input).filter(|e| e.tag == SEQUENCE)?;
    let mut input = list.contents;
    while !input.is_empty() {
        let extension = next(&mut input).filter(|e| e.tag == SEQUENCE)?;
        let mut parts = extension.contents;
        let id = next(&mut parts).filter(|e| e.tag == OBJECT_ID)?;
        if id.contents != SUBJECT_ALT_NAME {
            continue;
        }
        let mut value = next(&mut parts)?;
        if value.tag == BOOLEAN {
            value = next(&mut parts)?;
        }
        if value.tag != OCTET_STRING {
            return None;
        }
        let mut inner = value.contents;
        let names = next(&mut inner).filter(|e| e.tag == SEQUENCE)?;
        let mut input = names.contents;
        let mut uris = Vec::new();
        while !input.is_empty() {
            let name = next(&mut input)?;
            if name.tag == URI_NAME {
                uris.push(String::from_utf8_lossy(name.contents).into_owned());
            }
        }
        return Some(uris);
    }
    Some(Vec::new())
}
