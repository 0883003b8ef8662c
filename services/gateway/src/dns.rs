//! Name resolution for `--discover dns:NAME:PORT`: every A and AAAA record of a name.
//!
//! By default the system resolver answers (`getaddrinfo`, so `/etc/resolv.conf` search domains
//! apply, as in a Kubernetes pod). With `--dns-server IP:PORT` the gateway asks that server
//! itself, over UDP (TCP when the answer is truncated), with a small client of its own: one
//! A and one AAAA query, no cache, no search domains. That client tells "the name has no
//! records" (NXDOMAIN, or NOERROR with no answer: membership becomes empty) from "the server did
//! not answer" (an error: the caller keeps the last membership).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Bound on one query (UDP wait, or the whole TCP exchange).
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

/// Record types asked for.
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// Checks that `name` is a DNS name: labels of 1 to 63 letters, digits, '-' or '_', at most
/// 253 characters, an optional final dot.
///
/// # Errors
///
/// A message naming the problem.
pub fn validate_name(name: &str) -> Result<(), String> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || trimmed.len() > 253 {
        return Err(format!("{name:?} is not a DNS name (1 to 253 characters)"));
    }
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{name:?} is not a DNS name: every label has 1 to 63 characters"
            ));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!("{name:?} is not a DNS name: it contains {bad:?}"));
        }
    }
    Ok(())
}

/// Every address of `name`, sorted, without duplicates.
///
/// # Errors
///
/// A message when the resolver fails or does not answer in time.
pub async fn resolve(name: &str, server: Option<SocketAddr>) -> Result<Vec<IpAddr>, String> {
    let addresses: BTreeSet<IpAddr> = match server {
        None => tokio::time::timeout(QUERY_TIMEOUT * 2, tokio::net::lookup_host((name, 0)))
            .await
            .map_err(|_| format!("resolving {name}: no answer within {:?}", QUERY_TIMEOUT * 2))?
            .map_err(|e| format!("resolving {name}: {e}"))?
            .map(|a| a.ip())
            .collect(),
        Some(server) => {
            let (v4, v6) = tokio::join!(
                query(server, name, TYPE_A, 1),
                query(server, name, TYPE_AAAA, 2)
            );
            match (v4, v6) {
                (Ok(v4), Ok(v6)) => v4.into_iter().chain(v6).collect(),
                // A server that knows only one family may refuse the other: use what answered,
                // but never read "no records" into a failure (one lost datagram must not empty
                // the membership).
                (Ok(found), Err(error)) | (Err(error), Ok(found)) => {
                    if found.is_empty() {
                        return Err(error);
                    }
                    found.into_iter().collect()
                }
                (Err(error), Err(_)) => return Err(error),
            }
        }
    };
    Ok(addresses.into_iter().collect())
}

/// Asks `server` for the `qtype` records of `name`.
async fn query(
    server: SocketAddr,
    name: &str,
    qtype: u16,
    id_salt: u16,
) -> Result<Vec<IpAddr>, String> {
    // The id only has to tell our two concurrent queries apart and reject stray datagrams.
    let id = (std::process::id() as u16)
        .wrapping_mul(31)
        .wrapping_add(id_salt)
        .wrapping_add(dlb::events::time::now_ms() as u16);
    let message = encode_query(id, name, qtype)?;
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let udp = async {
        let socket = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        socket.connect(server).await.map_err(|e| e.to_string())?;
        socket.send(&message).await.map_err(|e| e.to_string())?;
        let mut buffer = vec![0u8; 4096];
        loop {
            let n = socket.recv(&mut buffer).await.map_err(|e| e.to_string())?;
            match decode_answer(&buffer[..n], id, qtype) {
                // Not ours (a late answer to an earlier query): keep waiting.
                Err(DecodeError::WrongId) => continue,
                other => return Ok::<_, String>(other),
            }
        }
    };
    let decoded = tokio::time::timeout(QUERY_TIMEOUT, udp)
        .await
        .map_err(|_| format!("DNS server {server}: no answer within {QUERY_TIMEOUT:?}"))??;
    let decoded = match decoded {
        Err(DecodeError::Truncated) => {
            tokio::time::timeout(QUERY_TIMEOUT, query_tcp(server, &message, id, qtype))
                .await
                .map_err(|_| {
                    format!("DNS server {server} (TCP): no answer within {QUERY_TIMEOUT:?}")
                })??
        }
        other => other,
    };
    decoded.map_err(|e| format!("DNS server {server}: {e}"))
}

async fn query_tcp(
    server: SocketAddr,
    message: &[u8],
    id: u16,
    qtype: u16,
) -> Result<Result<Vec<IpAddr>, DecodeError>, String> {
    let mut stream = TcpStream::connect(server)
        .await
        .map_err(|e| e.to_string())?;
    let length = u16::try_from(message.len()).map_err(|_| "query too long".to_owned())?;
    stream
        .write_all(&length.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(message).await.map_err(|e| e.to_string())?;
    let length = stream.read_u16().await.map_err(|e| e.to_string())?;
    let mut buffer = vec![0u8; usize::from(length)];
    stream
        .read_exact(&mut buffer)
        .await
        .map_err(|e| e.to_string())?;
    Ok(decode_answer(&buffer, id, qtype))
}

/// A standard query with recursion desired.
fn encode_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, String> {
    validate_name(name)?;
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00]); // RD
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // class IN
    Ok(out)
}

/// Why an answer was not used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum DecodeError {
    #[error("answer to another query")]
    WrongId,
    #[error("answer truncated")]
    Truncated,
    #[error("server failed (rcode {0})")]
    Failed(u8),
    #[error("malformed answer")]
    Malformed,
}

/// The `qtype` addresses in an answer; NXDOMAIN is an empty list.
fn decode_answer(message: &[u8], id: u16, qtype: u16) -> Result<Vec<IpAddr>, DecodeError> {
    let u16_at = |i: usize| -> Result<u16, DecodeError> {
        message
            .get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(DecodeError::Malformed)
    };
    if u16_at(0)? != id {
        return Err(DecodeError::WrongId);
    }
    let flags = u16_at(2)?;
    if flags & 0x8000 == 0 {
        return Err(DecodeError::Malformed);
    }
    if flags & 0x0200 != 0 {
        return Err(DecodeError::Truncated);
    }
    match (flags & 0x000f) as u8 {
        0 => {}
        3 => return Ok(Vec::new()), // NXDOMAIN
        rcode => return Err(DecodeError::Failed(rcode)),
    }
    let questions = u16_at(4)?;
    let answers = u16_at(6)?;
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(message, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        at = skip_name(message, at)?;
        let rtype = u16_at(at)?;
        let length = usize::from(u16_at(at + 8)?);
        let data = message
            .get(at + 10..at + 10 + length)
            .ok_or(DecodeError::Malformed)?;
        match (rtype, length) {
            (TYPE_A, 4) if qtype == TYPE_A => {
                out.push(IpAddr::from([data[0], data[1], data[2], data[3]]));
            }
            (TYPE_AAAA, 16) if qtype == TYPE_AAAA => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(data);
                out.push(IpAddr::from(octets));
            }
            // CNAME and anything else: the resolver already followed it.
            _ => {}
        }
        at += 10 + length;
    }
    Ok(out)
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(message: &[u8], mut at: usize) -> Result<usize, DecodeError> {
    loop {
        let length = *message.get(at).ok_or(DecodeError::Malformed)?;
        match length {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => return Ok(at + 2), // a pointer ends the name
            l if l & 0xc0 == 0 => at += 1 + usize::from(l),
            _ => return Err(DecodeError::Malformed),
        }
    }
}

/// The instance id for an address found by DNS: `10.0.0.7-13001`, `fd00..7-13001`.
pub fn instance_id(ip: IpAddr, port: u16) -> String {
    format!("{}-{port}", ip.to_string().replace(':', "."))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer to `query` with the given records (type, data), and `rcode`.
    fn answer(query: &[u8], rcode: u8, records: &[(u16, &[u8])]) -> Vec<u8> {
        let mut out = query.to_vec();
        out[2] = 0x81; // QR, RD
        out[3] = 0x80 | rcode; // RA
        out[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (rtype, data) in records {
            out.extend_from_slice(&[0xc0, 12]); // pointer to the question's name
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&[0, 1, 0, 0, 0, 30]);
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn answers_decode_to_their_addresses() {
        let query = encode_query(7, "dlb.test", TYPE_A).unwrap();
        let cname: &[u8] = &[3, b'f', b'o', b'o', 0];
        let message = answer(
            &query,
            0,
            &[
                (5, cname),
                (TYPE_A, &[10, 0, 0, 2]),
                (TYPE_A, &[10, 0, 0, 3]),
            ],
        );
        assert_eq!(
            decode_answer(&message, 7, TYPE_A),
            Ok(vec![
                IpAddr::from([10, 0, 0, 2]),
                IpAddr::from([10, 0, 0, 3])
            ])
        );
        let v6 = Ipv6Addr::LOCALHOST.octets();
        let query = encode_query(8, "dlb.test", TYPE_AAAA).unwrap();
        assert_eq!(
            decode_answer(&answer(&query, 0, &[(TYPE_AAAA, &v6)]), 8, TYPE_AAAA),
            Ok(vec![IpAddr::from(Ipv6Addr::LOCALHOST)])
        );
    }

    #[test]
    fn failures_are_told_apart_from_empty_names() {
        let query = encode_query(9, "gone.test", TYPE_A).unwrap();
        assert_eq!(
            decode_answer(&answer(&query, 3, &[]), 9, TYPE_A),
            Ok(vec![])
        );
        assert_eq!(
            decode_answer(&answer(&query, 0, &[]), 9, TYPE_A),
            Ok(vec![])
        );
        assert_eq!(
            decode_answer(&answer(&query, 2, &[]), 9, TYPE_A),
            Err(DecodeError::Failed(2))
        );
        assert_eq!(
            decode_answer(&answer(&query, 0, &[]), 10, TYPE_A),
            Err(DecodeError::WrongId)
        );
        let mut truncated = answer(&query, 0, &[]);
        truncated[2] |= 0x02;
        assert_eq!(
            decode_answer(&truncated, 9, TYPE_A),
            Err(DecodeError::Truncated)
        );
        let cut_short = &answer(&query, 0, &[(TYPE_A, &[10, 0, 0, 2])])[..query.len() + 6];
        assert_eq!(
            decode_answer(cut_short, 9, TYPE_A),
            Err(DecodeError::Malformed)
        );
        assert_eq!(
            decode_answer(&[0, 9], 9, TYPE_A),
            Err(DecodeError::Malformed)
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("dlb-compute.default.svc.cluster.local.").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a..b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(64)).is_err());
        assert_eq!(
            instance_id(IpAddr::from([10, 0, 0, 7]), 13001),
            "10.0.0.7-13001"
        );
        assert!(
            dlb::metadata::validate_instance_id(&instance_id(
                IpAddr::from(Ipv6Addr::LOCALHOST),
                13001
            ))
            .is_ok()
        );
    }
}
