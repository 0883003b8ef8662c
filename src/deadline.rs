//! Deadlines: the `grpc-timeout` header, and the margin servers keep back from it.

use std::time::Duration;

/// Time a dlb server keeps back from the caller's deadline, so that its own
/// DEADLINE_EXCEEDED reaches the caller before the caller's timer fires (tonic clients report
/// their own timer as a vaguer CANCELLED "Timeout expired", and tonic servers answer an expired
/// `grpc-timeout` with CANCELLED too). Deadlines shorter than this are exceeded at once.
pub const MARGIN: Duration = Duration::from_millis(20);

use tonic::codegen::http;
use tonic::metadata::MetadataMap;

/// The `grpc-timeout` header's name, made ahead: it is read and written on every call, and a
/// name given as a string is parsed each time.
pub const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The caller's timeout, if it sent a valid `grpc-timeout` (1-8 digits and a unit: H, M, S, m,
/// u or n).
pub fn from_metadata(metadata: &MetadataMap) -> Option<Duration> {
    from_headers(metadata.as_ref())
}

/// Like [`from_metadata`], from HTTP headers.
pub fn from_headers(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `timeout` as a `grpc-timeout` value, rounded down (never above `timeout`) to its three
/// leading digits, in the coarsest unit that holds them exactly: 29.987 s is `29900m`,
/// 250 ms `250m`, 1,234 µs `1230u`.
///
/// What is lost is under 1% of the time left. What is won: the same deadline relayed again
/// (a caller's fixed timeout, the gateway's default) is the same value, which HPACK sends
/// once and then as a one-byte index, where an exact remaining time would be new on every
/// call (sent in full, and decoded in full by the instance, every time). Only a value equal
/// to the last one this thread wrote is left indexable; any other is marked sensitive (never
/// indexed), so that deadlines that vary from call to call (passed on from further up,
/// retries) do not fill the connection's HPACK table and push out the headers that repeat.
pub fn to_header(timeout: Duration) -> http::HeaderValue {
    let (n, unit) = rounded(timeout);
    // At most 8 digits and the unit, written on the stack.
    let mut buf = [0; 20];
    let digits = crate::decimal::digits(n, &mut buf);
    let mut text = [0u8; 21];
    text[..digits.len()].copy_from_slice(digits.as_bytes());
    text[digits.len()] = unit;
    // Digits and one ASCII letter: always a valid header value.
    let mut value = http::HeaderValue::from_bytes(&text[..=digits.len()])
        .unwrap_or(http::HeaderValue::from_static("99999999H"));
    let repeated = LAST_WRITTEN.with(|last| last.replace(Some((n, unit))) == Some((n, unit)));
    value.set_sensitive(!repeated);
    value
}

thread_local! {
    /// The last `grpc-timeout` this thread wrote (a gateway's runtime writes to its own
    /// connections).
    static LAST_WRITTEN: std::cell::Cell<Option<(u64, u8)>> = const { std::cell::Cell::new(None) };
}

/// `timeout` rounded down to three leading digits, as a count of the coarsest unit that
/// holds it exactly in at most 8 digits (hours, rounded down further, past any).
fn rounded(timeout: Duration) -> (u64, u8) {
    // (units in µs, the unit's letter), coarsest first.
    const UNITS: [(u128, u8); 5] = [
        (3_600_000_000, b'H'),
        (60_000_000, b'M'),
        (1_000_000, b'S'),
        (1_000, b'm'),
        (1, b'u'),
    ];
    const MAX_DIGITS: u128 = 99_999_999;
    let micros = timeout.as_micros();
    // Three leading digits: the rest zeroed.
    let mut scale = 1;
    while micros / scale >= 1_000 {
        scale *= 10;
    }
    let rounded = micros / scale * scale;
    // The coarsest unit that holds the rounded time exactly in at most 8 digits; hours
    // (rounded down further) for times too long for any.
    let (n, unit) = UNITS
        .iter()
        .find(|&&(size, _)| {
            (rounded >= size || size == 1)
                && rounded.is_multiple_of(size)
                && rounded / size <= MAX_DIGITS
        })
        .map_or(
            ((micros / UNITS[0].0).min(MAX_DIGITS), b'H'),
            |&(size, unit)| (rounded / size, unit),
        );
    // At most 8 digits: always fits.
    (u64::try_from(n).unwrap_or(99_999_999), unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> Option<Duration> {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", v.parse().unwrap());
        from_metadata(&m)
    }

    #[test]
    fn parses_every_unit_and_rejects_junk() {
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("20u"), Some(Duration::from_micros(20)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(from_metadata(&MetadataMap::new()), None);
    }

    #[test]
    fn timeouts_round_trip_through_the_header() {
        for d in [
            Duration::from_micros(1),
            Duration::from_millis(1500),
            Duration::from_secs(99),
            Duration::from_secs(3 * 86_400),
            Duration::from_secs(200_000_000),
        ] {
            let mut m = MetadataMap::new();
            m.insert(
                "grpc-timeout",
                to_header(d).to_str().unwrap().parse().unwrap(),
            );
            let back = from_metadata(&m).unwrap();
            assert!(back <= d, "{d:?} -> {back:?}");
            assert!(
                back.as_secs_f64() >= d.as_secs_f64() * 0.99,
                "{d:?} -> {back:?}"
            );
        }
        assert_eq!(to_header(Duration::from_millis(250)), "250m");
        assert_eq!(to_header(Duration::ZERO), "0u");
        assert_eq!(to_header(Duration::from_micros(1_234)), "1230u");
        assert_eq!(to_header(Duration::from_micros(999)), "999u");
        assert_eq!(to_header(Duration::from_micros(29_987_654)), "29900m");
        assert_eq!(to_header(Duration::from_secs(120)), "2M");
        assert_eq!(to_header(Duration::from_secs(7_200)), "2H");
        assert_eq!(to_header(Duration::MAX), "99999999H");
    }

    #[test]
    fn a_deadline_relayed_again_a_little_later_is_the_same_value() {
        // A caller's 30 s timeout, relayed 20 µs or 900 µs after it arrived: one value, which
        // HPACK indexes (not marked sensitive) and then sends as an index.
        let first = to_header(Duration::from_micros(29_999_980));
        let again = to_header(Duration::from_micros(29_999_100));
        assert_eq!(first, again);
        assert!(!again.is_sensitive());
    }

    #[test]
    fn deadlines_that_vary_are_never_indexed() {
        // Each differs from the one before: all marked sensitive, so HPACK never adds them
        // to the table (where they would push out the headers that repeat).
        for ms in [4_000, 3_210, 2_990, 4_000] {
            assert!(to_header(Duration::from_millis(ms)).is_sensitive(), "{ms}");
        }
        // Then the same again: indexable.
        assert!(!to_header(Duration::from_millis(4_000)).is_sensitive());
    }
}
