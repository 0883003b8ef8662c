//! `Fibonacci`: F(n) by fast doubling on big integers, printed in decimal.
//!
//! Fast doubling walks the bits of n from the top: from (F(k), F(k+1)) it gets
//! F(2k) = F(k) (2 F(k+1) - F(k)) and F(2k+1) = F(k)^2 + F(k+1)^2, so F(n) takes about log2(n)
//! big multiplications. Big integers are `dashu-int` (MIT/Apache-2.0): within about 3x of GMP at
//! F(10^7) including decimal printing, where num-bigint is over 4x (see README, Performance).

use dashu_int::UBig;
use dashu_int::ops::{BitTest, DivRem};

use super::{Cancel, Cancelled, check};

/// Default largest n accepted (override with `--max-fib-n` / `DLB_COMPUTE_MAX_FIB_N`).
/// F(10^7) has 2,089,877 digits: about a second of one core, and a 2 MB response that fits in
/// gRPC's default 4 MiB message size.
pub const DEFAULT_MAX_FIB_N: u64 = 10_000_000;

/// Values of n up to this are answered inline on the async runtime (microseconds of work);
/// larger ones go to the CPU pool.
pub const INLINE_MAX_N: u64 = 20_000;

/// Digits printed in one piece (by dashu's own conversion) between two looks at the caller's
/// cancellation: a few milliseconds of work.
const PIECE_DIGITS: usize = 1 << 16;

/// F(n) in decimal. Checks `cancel` between doubling steps, and between the pieces of the
/// decimal printing, which is most of the work for a large n (F(10^7): about 0.7 s of 0.9 s).
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
    to_decimal(&value, PIECE_DIGITS, &mut || check(cancel))
}

/// `value` in decimal, calling `go_on` between pieces of about `piece` digits (and stopping at
/// its first error): divide and conquer by the powers 10^(piece·2^j), each the square of the
/// one before, the low half of each split padded with zeros to its exact width.
///
/// # Errors
///
/// The first error of `go_on`.
fn to_decimal(
    value: &UBig,
    piece: usize,
    go_on: &mut dyn FnMut() -> Result<(), Cancelled>,
) -> Result<String, Cancelled> {
    // Below 2^bits <= 10^piece: one piece, printed at once (no power of ten to make: nearly
    // every call's F(n) is this small).
    #[allow(clippy::cast_precision_loss)]
    if value.bit_len() as f64 <= piece as f64 * std::f64::consts::LOG2_10 {
        return Ok(value.to_string());
    }
    let mut powers = vec![UBig::from(10u8).pow(piece)];
    // Up to about half the value's length: a larger power would leave nothing to split.
    while let Some(last) = powers.last()
        && 2 * last.bit_len() <= value.bit_len() + 1
    {
        go_on()?;
        let next = last.sqr();
        powers.push(next);
    }
    let mut out = String::new();
    write_decimal(value, &powers, piece, None, &mut out, go_on)?;
    Ok(out)
}

/// Appends `x` in decimal to `out`, with leading zeros up to `width` digits when given
/// (`x < 10^width`). `powers[j]` is 10^(piece·2^j).
fn write_decimal(
    x: &UBig,
    powers: &[UBig],
    piece: usize,
    width: Option<usize>,
    out: &mut String,
    go_on: &mut dyn FnMut() -> Result<(), Cancelled>,
) -> Result<(), Cancelled> {
    go_on()?;
    // The largest power not above x (the powers grow).
    let Some(j) = powers.iter().rposition(|power| power <= x) else {
        let digits = x.to_string();
        if let Some(width) = width {
            out.extend(std::iter::repeat_n('0', width.saturating_sub(digits.len())));
        }
        out.push_str(&digits);
        return Ok(());
    };
    // x < powers[j]^2 (else powers[j + 1] would be the largest), so the high part is below
    // powers[j] too: both halves are split by the smaller powers only.
    let (high, low) = x.div_rem(&powers[j]);
    let low_width = piece << j;
    let high_width = width.map(|width| width.saturating_sub(low_width));
    write_decimal(&high, &powers[..j], piece, high_width, out, go_on)?;
    write_decimal(&low, &powers[..j], piece, Some(low_width), out, go_on)
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
    fn decimal_printing_in_pieces_is_exact() {
        let ten = UBig::from(10u8);
        let mut values = vec![UBig::ZERO, UBig::ONE, UBig::from(9u8), ten.clone()];
        for k in [3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100] {
            let power = ten.pow(k);
            values.push(&power - UBig::ONE);
            values.push(power.clone() + UBig::ONE);
            // Zeros across a split: 7 followed by k zeros, then 1.
            values.push(UBig::from(7u8) * &power * &power + UBig::ONE);
            values.push(power);
        }
        for n in [94, 300, 1_000, 4_321] {
            values.push(fib_big(n, &Cancel::new()).unwrap());
        }
        for value in &values {
            for piece in [1, 2, 3, 4, 7, 16] {
                let printed = to_decimal(value, piece, &mut || Ok(())).unwrap();
                assert_eq!(printed, value.to_string(), "piece {piece}");
            }
        }
    }

    #[test]
    fn decimal_printing_stops_at_the_first_no() {
        let value = fib_big(10_000, &Cancel::new()).unwrap();
        let mut looks = 0;
        let stopped = to_decimal(&value, 8, &mut || {
            looks += 1;
            if looks == 5 { Err(Cancelled) } else { Ok(()) }
        });
        assert_eq!(stopped, Err(Cancelled));
        // It looked no further once told to stop, and it looks often: F(10^4)'s 2,090 digits
        // in pieces of 8 take far more than 5 looks.
        assert_eq!(looks, 5);
        let mut all = 0;
        to_decimal(&value, 8, &mut || {
            all += 1;
            Ok(())
        })
        .unwrap();
        assert!(all > 100, "{all} looks");
    }

    #[test]
    fn cancelled_work_stops() {
        let cancel = Cancel::new();
        cancel.cancel();
        assert_eq!(fibonacci(1_000_000, &cancel), Err(Cancelled));
    }
}
