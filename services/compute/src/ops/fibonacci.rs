//! `Fibonacci`: F(n) by fast doubling on big integers, printed in decimal.
//!
//! Fast doubling walks the bits of n from the top: from (F(k), F(k+1)) it gets
//! F(2k) = F(k) (2 F(k+1) - F(k)) and F(2k+1) = F(k)^2 + F(k+1)^2, so F(n) takes about log2(n)
//! big multiplications. Big integers are `dashu-int` (MIT/Apache-2.0): within about 3x of GMP at
//! F(10^7) including decimal printing, where num-bigint is over 4x (see README, Performance).

use dashu_int::UBig;

use super::{Cancel, Cancelled, check};

/// Default largest n accepted (override with `--max-fib-n` / `DLB_COMPUTE_MAX_FIB_N`).
/// F(10^7) has 2,089,877 digits: about a second of one core, and a 2 MB response that fits in
/// gRPC's default 4 MiB message size.
pub const DEFAULT_MAX_FIB_N: u64 = 10_000_000;

/// Values of n up to this are answered inline on the async runtime (microseconds of work);
/// larger ones go to the CPU pool.
pub const INLINE_MAX_N: u64 = 20_000;

/// F(n) in decimal. Checks `cancel` between doubling steps.
///
/// # Errors
///
/// [`Cancelled`] when `cancel` fires first.
pub fn fibonacci(n: u64, cancel: &Cancel) -> Result<String, Cancelled> {
    if n <= 93 {
        // F(93) is the largest Fibonacci number that fits in a u64.
        return Ok(fib_u64(n).to_string());
    }
    let value = fib_big(n, cancel)?;
    check(cancel)?;
    Ok(value.to_string())
}

fn fib_u64(n: u64) -> u64 {
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        // b runs one step ahead and may wrap at n = 93; a never does.
        (a, b) = (b, a.wrapping_add(b));
    }
    a
}

/// F(n) as a big integer by fast doubling.
///
/// # Errors
///
/// [`Cancelled`] when `cancel` fires first.
pub fn fib_big(n: u64, cancel: &Cancel) -> Result<UBig, Cancelled> {
    // (a, b) = (F(k), F(k+1)), starting from k = 0.
    let (mut a, mut b) = (UBig::ZERO, UBig::ONE);
    let bits = u64::BITS - n.leading_zeros();
    for i in (0..bits).rev() {
        check(cancel)?;
        let odd = (n >> i) & 1 == 1;
        if i == 0 {
            // The last step needs only F(n), so skip the other product.
            return Ok(if odd {
                &a * &a + &b * &b
            } else {
                &a * ((&b << 1) - &a)
            });
        }
        let f2k = &a * ((&b << 1) - &a);
        let f2k1 = &a * &a + &b * &b;
        if odd {
            a = f2k1;
            b = f2k + &a;
        } else {
            a = f2k;
            b = f2k1;
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fib(n: u64) -> String {
        fibonacci(n, &Cancel::new()).unwrap()
    }

    #[test]
    fn table_of_known_values() {
        assert_eq!(fib(0), "0");
        assert_eq!(fib(1), "1");
        assert_eq!(fib(2), "1");
        assert_eq!(fib(10), "55");
        assert_eq!(fib(93), "12200160415121876738");
        assert_eq!(fib(94), "19740274219868223167");
        assert_eq!(fib(95), "31940434634990099905");
        assert_eq!(fib(100), "354224848179261915075");
        assert_eq!(fib(1000).len(), 209);
        assert!(fib(1000).starts_with("43466557686937456435"));
        assert!(fib(1000).ends_with("76137795166849228875"));
    }

    #[test]
    fn big_path_agrees_with_u64_path() {
        for n in 0..=93 {
            assert_eq!(
                fib_big(n, &Cancel::new()).unwrap().to_string(),
                fib_u64(n).to_string()
            );
        }
    }

    #[test]
    fn cancelled_work_stops() {
        let cancel = Cancel::new();
        cancel.cancel();
        assert_eq!(fibonacci(1_000_000, &cancel), Err(Cancelled));
    }
}
