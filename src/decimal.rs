//! Decimal numbers written on the stack, for text made on every call (the access log's lines,
//! the `grpc-timeout` sent to instances), where `format!` would allocate and go through `fmt`.

/// The decimal digits of `n`, written at the end of `buf`.
pub(crate) fn digits(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        // n % 10 < 10: the cast is exact.
        #[allow(clippy::cast_possible_truncation)]
        let digit = (n % 10) as u8;
        buf[at] = b'0' + digit;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits only.
    std::str::from_utf8(&buf[at..]).unwrap_or("0")
}

#[cfg(test)]
mod tests {
    #[test]
    fn digits_of_every_size() {
        for n in [0, 7, 10, 99_999_999, u64::MAX] {
            assert_eq!(super::digits(n, &mut [0; 20]), n.to_string());
        }
    }
}
