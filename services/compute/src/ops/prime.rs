//! `IsPrime`: exact for n < 2^64, Baillie-PSW above.
//!
//! Below 2^64 a Miller-Rabin test over the seven bases found by Jim Sinclair is deterministic
//! (no composite below 2^64 passes all of them), so the answer is `PROVEN`. The seven bases share
//! one exponent, so they run interleaved in Montgomery form: the CPU overlaps their
//! multiplications and the worst case (a prime near 2^64) stays under a microsecond.
//!
//! At and above 2^64 the test is Baillie-PSW (a strong base-2 test plus a strong Lucas test with
//! Selfridge's parameters): no counterexample is known, but none is proven impossible, so a
//! "prime" answer is `PROBABLE`; a "composite" answer is always `PROVEN`.

use dashu_int::{
    UBig,
    fast_div::ConstDivisor,
    ops::{BitTest, SquareRoot},
};

use super::{Cancel, Cancelled, check};

/// Default maximum number of decimal digits accepted by `IsPrime` (override with
/// `--max-prime-digits` / `DLB_COMPUTE_MAX_PRIME_DIGITS`). A 2,000-digit Baillie-PSW test takes
/// well under a second on one core.
pub const DEFAULT_MAX_PRIME_DIGITS: usize = 2_000;

/// Inputs of at most this many digits are answered inline on the async runtime (they take
/// microseconds); longer ones go to the CPU pool.
pub const INLINE_MAX_DIGITS: usize = 20;

/// How sure an answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Certainty {
    /// The answer is a theorem.
    Proven,
    /// Baillie-PSW says prime; no counterexample is known.
    Probable,
}

/// The answer to "is n prime?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Primality {
    /// Whether n is (probably) prime.
    pub prime: bool,
    /// How sure the answer is.
    pub certainty: Certainty,
}

/// A parsed non-negative integer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Number {
    /// Fits in 64 bits.
    Small(u64),
    /// At least 2^64.
    Big(UBig),
}

impl Number {
    /// Number of significant decimal digits.
    pub fn digits(&self) -> usize {
        match self {
            Number::Small(n) => n.checked_ilog10().map_or(1, |d| d as usize + 1),
            Number::Big(n) => n.to_string().len(),
        }
    }
}

/// Why a string is not an acceptable number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    /// The string is empty.
    #[error("must be a non-negative decimal integer, got an empty string")]
    Empty,
    /// A character other than an ASCII digit.
    #[error(
        "must be a non-negative decimal integer (ASCII digits 0-9 only), got {preview:?}: \
         {found:?} at character {position} is not a digit"
    )]
    NotADigit {
        /// The start of the input, for the message.
        preview: String,
        /// The offending character.
        found: char,
        /// Its position, in characters from 0.
        position: usize,
    },
    /// More significant digits than the configured limit.
    #[error("has {digits} digits, over the limit of {limit} digits (--max-prime-digits)")]
    TooManyDigits {
        /// Significant digits (leading zeros not counted).
        digits: usize,
        /// The configured limit.
        limit: usize,
    },
}

/// Longest part of a bad input echoed back in an error message, in characters.
const PREVIEW_CHARS: usize = 32;

/// Parses a decimal number: ASCII digits only, no sign, whitespace or separators; leading zeros
/// are allowed and not counted against `max_digits`.
///
/// # Errors
///
/// [`NumberError`] saying what is wrong and where.
pub fn parse_number(input: &str, max_digits: usize) -> Result<Number, NumberError> {
    if input.is_empty() {
        return Err(NumberError::Empty);
    }
    if let Some((position, found)) = input.chars().enumerate().find(|(_, c)| !c.is_ascii_digit()) {
        let mut preview: String = input.chars().take(PREVIEW_CHARS).collect();
        if input.chars().nth(PREVIEW_CHARS).is_some() {
            preview.push('…');
        }
        return Err(NumberError::NotADigit {
            preview,
            found,
            position,
        });
    }
    let significant = input.trim_start_matches('0');
    if significant.len() > max_digits {
        return Err(NumberError::TooManyDigits {
            digits: significant.len(),
            limit: max_digits,
        });
    }
    if let Ok(n) = significant.parse::<u64>() {
        return Ok(Number::Small(n));
    }
    if significant.is_empty() {
        return Ok(Number::Small(0));
    }
    // Only ASCII digits remain, so this cannot fail; map it anyway rather than panic.
    significant
        .parse::<UBig>()
        .map(Number::Big)
        .map_err(|_| NumberError::Empty)
}

/// Is `n` prime? Checks `cancel` between steps for large inputs.
///
/// # Errors
///
/// [`Cancelled`] when `cancel` fires first.
pub fn is_prime(n: &Number, cancel: &Cancel) -> Result<Primality, Cancelled> {
    match n {
        Number::Small(n) => Ok(Primality {
            prime: is_prime_u64(*n),
            certainty: Certainty::Proven,
        }),
        Number::Big(n) => {
            let prime = baillie_psw(n, cancel)?;
            Ok(Primality {
                prime,
                certainty: if prime {
                    Certainty::Probable
                } else {
                    Certainty::Proven
                },
            })
        }
    }
}

const SMALL_PRIMES: [u64; 12] = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37];

/// Bases for which strong probable-prime tests are deterministic for every n < 2^64.
const SINCLAIR_BASES: [u64; 7] = [2, 325, 9375, 28178, 450775, 9780504, 1795265022];

/// Deterministic primality for 64-bit integers.
pub fn is_prime_u64(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    for p in SMALL_PRIMES {
        if n == p {
            return true;
        }
        if n.is_multiple_of(p) {
            return false;
        }
    }
    // No factor up to 37, so any n below 41^2 is prime.
    if n < 41 * 41 {
        return true;
    }
    let m = Montgomery::new(n);
    let s = (n - 1).trailing_zeros();
    let d = (n - 1) >> s;
    let one = m.one;
    let minus_one = n - m.one;

    // x[i] = base[i]^d, all bases in lock step so their multiplications overlap.
    let mut base = [0u64; 7];
    let mut trivial = [false; 7];
    for (i, b) in SINCLAIR_BASES.iter().enumerate() {
        let b = b % n;
        trivial[i] = b == 0;
        base[i] = m.to_mont(b);
    }
    let mut x = [one; 7];
    for bit in (0..64 - d.leading_zeros()).rev() {
        for xi in &mut x {
            *xi = m.mul(*xi, *xi);
        }
        if (d >> bit) & 1 == 1 {
            for (xi, bi) in x.iter_mut().zip(base) {
                *xi = m.mul(*xi, bi);
            }
        }
    }
    (0..7).all(|i| {
        if trivial[i] {
            return true;
        }
        let mut xi = x[i];
        if xi == one || xi == minus_one {
            return true;
        }
        for _ in 1..s {
            xi = m.mul(xi, xi);
            if xi == minus_one {
                return true;
            }
        }
        false
    })
}

/// Montgomery arithmetic modulo an odd 64-bit n, with R = 2^64.
struct Montgomery {
    n: u64,
    /// n * inv == 1 (mod 2^64).
    inv: u64,
    /// R^2 mod n, to enter Montgomery form.
    r2: u64,
    /// R mod n: the Montgomery form of 1.
    one: u64,
}

impl Montgomery {
    fn new(n: u64) -> Self {
        // Newton's iteration doubles the correct low bits each step: 3 -> 6 -> ... -> 96 >= 64.
        let mut inv = n;
        for _ in 0..5 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(n.wrapping_mul(inv)));
        }
        let one = ((u128::from(u64::MAX) + 1) % u128::from(n)) as u64;
        let r2 = (u128::from(one) * u128::from(one) % u128::from(n)) as u64;
        Self { n, inv, r2, one }
    }

    fn to_mont(&self, a: u64) -> u64 {
        self.mul(a, self.r2)
    }

    /// a * b / R mod n, for a, b < n.
    #[inline(always)]
    fn mul(&self, a: u64, b: u64) -> u64 {
        let t = u128::from(a) * u128::from(b);
        let lo = t as u64;
        let hi = (t >> 64) as u64;
        let m = lo.wrapping_mul(self.inv);
        // lo(m * n) == lo(t), so hi(t) - hi(m * n) is exactly (t - m * n) / R.
        let mn_hi = ((u128::from(m) * u128::from(self.n)) >> 64) as u64;
        let (r, borrow) = hi.overflowing_sub(mn_hi);
        if borrow { r.wrapping_add(self.n) } else { r }
    }
}

/// Odd primes below 1,000 used for trial division of large inputs before Baillie-PSW.
fn trial_primes() -> impl Iterator<Item = u64> {
    (3u64..1000).step_by(2).filter(|&p| {
        (3..)
            .step_by(2)
            .take_while(|d| d * d <= p)
            .all(|d| p % d != 0)
    })
}

/// How many loop steps pass between cancellation checks in the big-number tests.
const CHECK_EVERY: usize = 64;

/// Baillie-PSW for n >= 2^64.
fn baillie_psw(n: &UBig, cancel: &Cancel) -> Result<bool, Cancelled> {
    if n % 2u64 == 0 {
        return Ok(false);
    }
    for p in trial_primes() {
        if n % p == 0 {
            return Ok(false);
        }
    }
    let ring = ConstDivisor::new(n.clone());
    if !strong_probable_prime_base2(n, &ring, cancel)? {
        return Ok(false);
    }
    strong_lucas(n, &ring, cancel)
}

fn strong_probable_prime_base2(
    n: &UBig,
    ring: &ConstDivisor,
    cancel: &Cancel,
) -> Result<bool, Cancelled> {
    let n_minus_1 = n - UBig::ONE;
    let s = n_minus_1.trailing_zeros().unwrap_or(0);
    let d = &n_minus_1 >> s;
    let one = ring.reduce(1u8);
    let minus_one = ring.reduce(n_minus_1.clone());
    let mut x = ring.reduce(2u8).pow(&d);
    check(cancel)?;
    if x == one || x == minus_one {
        return Ok(true);
    }
    for step in 1..s {
        x = x.sqr();
        if x == minus_one {
            return Ok(true);
        }
        if step % CHECK_EVERY == 0 {
            check(cancel)?;
        }
    }
    Ok(false)
}

/// Jacobi symbol (a / n) for odd n > 0 and small signed a.
fn jacobi(a: i64, n: &UBig) -> i32 {
    let n_mod_8 = n % 8u64;
    let mut result = 1;
    if a < 0 && n_mod_8 % 4 == 3 {
        result = -result;
    }
    let mut a = a.unsigned_abs();
    if a == 0 {
        return i32::from(*n == UBig::ONE);
    }
    while a.is_multiple_of(2) {
        a /= 2;
        if n_mod_8 == 3 || n_mod_8 == 5 {
            result = -result;
        }
    }
    if a == 1 {
        return result;
    }
    // Quadratic reciprocity: (a / n) = (n mod a / a), negated when both are 3 mod 4.
    if a % 4 == 3 && n_mod_8 % 4 == 3 {
        result = -result;
    }
    result * jacobi_u64(n % a, a)
}

/// Jacobi symbol (a / n) for odd n > 0.
fn jacobi_u64(mut a: u64, mut n: u64) -> i32 {
    let mut result = 1;
    a %= n;
    while a != 0 {
        while a.is_multiple_of(2) {
            a /= 2;
            if n % 8 == 3 || n % 8 == 5 {
                result = -result;
            }
        }
        std::mem::swap(&mut a, &mut n);
        if a % 4 == 3 && n % 4 == 3 {
            result = -result;
        }
        a %= n;
    }
    if n == 1 { result } else { 0 }
}

/// Strong Lucas probable-prime test with Selfridge's method A: D is the first of 5, -7, 9,
/// -11, ... with (D / n) = -1, P = 1, Q = (1 - D) / 4.
fn strong_lucas(n: &UBig, ring: &ConstDivisor, cancel: &Cancel) -> Result<bool, Cancelled> {
    let mut d: i64 = 5;
    loop {
        match jacobi(d, n) {
            -1 => break,
            0 => {
                // (D / n) = 0 means gcd(D, n) > 1; n is larger than |D|, so it is composite.
                return Ok(false);
            }
            _ => {}
        }
        // A perfect square never yields -1; look for one only after a few misses.
        if d == 13 && n.sqrt().pow(2) == *n {
            return Ok(false);
        }
        d = if d > 0 { -(d + 2) } else { -d + 2 };
    }
    let q = (1 - d) / 4;
    let n_plus_1 = n + UBig::ONE;
    let s = n_plus_1.trailing_zeros().unwrap_or(0);
    let k = &n_plus_1 >> s;

    let zero = ring.reduce(0u8);
    let dd = ring.reduce(d);
    let qq = ring.reduce(q);
    let half = ring.reduce((n + UBig::ONE) >> 1);
    // U_1 = 1, V_1 = P = 1, Q^1 = Q; walk the bits of k below the top one.
    let mut u = ring.reduce(1u8);
    let mut v = ring.reduce(1u8);
    let mut qk = qq.clone();
    let bits = k.bit_len();
    for (step, i) in (0..bits.saturating_sub(1)).rev().enumerate() {
        // Doubling: U_2k = U_k V_k, V_2k = V_k^2 - 2 Q^k, Q^2k = (Q^k)^2.
        u = &u * &v;
        v = v.sqr() - &qk - &qk;
        qk = qk.sqr();
        if k.bit(i) {
            // Increment with P = 1: U_k+1 = (U_k + V_k) / 2, V_k+1 = (D U_k + V_k) / 2.
            let new_u = (&u + &v) * &half;
            let new_v = (&dd * &u + &v) * &half;
            u = new_u;
            v = new_v;
            qk = &qk * &qq;
        }
        if step % CHECK_EVERY == 0 {
            check(cancel)?;
        }
    }
    if u == zero || v == zero {
        return Ok(true);
    }
    for _ in 1..s {
        v = v.sqr() - &qk - &qk;
        qk = qk.sqr();
        if v == zero {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prime(s: &str) -> Primality {
        let n = parse_number(s, 5000).unwrap();
        is_prime(&n, &Cancel::new()).unwrap()
    }

    #[test]
    fn table_of_known_answers() {
        let cases: &[(&str, bool, Certainty)] = &[
            ("0", false, Certainty::Proven),
            ("1", false, Certainty::Proven),
            ("2", true, Certainty::Proven),
            ("3", true, Certainty::Proven),
            ("4", false, Certainty::Proven),
            ("97", true, Certainty::Proven),
            ("561", false, Certainty::Proven),        // Carmichael
            ("2047", false, Certainty::Proven),       // strong pseudoprime to base 2
            ("3215031751", false, Certainty::Proven), // spsp to bases 2, 3, 5, 7
            ("3825123056546413051", false, Certainty::Proven), // spsp to bases 2..=23
            ("18446744073709551557", true, Certainty::Proven), // 2^64 - 59
            ("18446744073709551615", false, Certainty::Proven), // 2^64 - 1
            ("18446744073709551617", false, Certainty::Proven), // 2^64 + 1 = 274177 * ...
            ("18446744073709551629", true, Certainty::Probable), // smallest prime > 2^64
            ("618970019642690137449562111", true, Certainty::Probable), // 2^89 - 1
            ("0000097", true, Certainty::Proven),
        ];
        for &(n, is, certainty) in cases {
            assert_eq!(
                prime(n),
                Primality {
                    prime: is,
                    certainty
                },
                "{n}"
            );
        }
    }

    #[test]
    fn thousand_digit_numbers() {
        // Known answers at about 1,000 digits: the Mersenne primes 2^3217 - 1 (969 digits) and
        // 2^4253 - 1 (1,281 digits), and composites built from them.
        let m3217 = (UBig::ONE << 3217) - UBig::ONE;
        let m4253 = (UBig::ONE << 4253) - UBig::ONE;
        assert_eq!(m4253.to_string().len(), 1281);
        assert!(prime(&m3217.to_string()).prime);
        assert!(prime(&m4253.to_string()).prime);
        // A product of two large primes is composite.
        let product = &m3217 * ((UBig::ONE << 89) - UBig::ONE);
        assert_eq!(
            prime(&product.to_string()),
            Primality {
                prime: false,
                certainty: Certainty::Proven
            }
        );
        // A 1,000-digit composite with no small factors: 2^3217 - 1 squared is a perfect square.
        let square = &m3217 * &m3217;
        assert!(!prime(&square.to_string()).prime);
        // 10^999 + 1 is divisible by 11 (odd power of 10 plus one): 1,000 digits exactly.
        let ten = UBig::from(10u8).pow(999) + UBig::ONE;
        assert_eq!(ten.to_string().len(), 1000);
        assert!(!prime(&ten.to_string()).prime);
    }

    #[test]
    fn a_product_of_two_primes_above_2_64_is_composite() {
        // No trial-division factor below 1,000, so Baillie-PSW itself must say composite.
        let p = UBig::from(4294967311u64); // prime
        let q = UBig::from(4294967357u64); // prime
        let n = &p * &q;
        assert!(!prime(&n.to_string()).prime);
    }

    #[test]
    fn jacobi_matches_euler_criterion_for_small_primes() {
        for p in [3u64, 5, 7, 11, 13, 101, 1009] {
            for a in -30i64..30 {
                let expected = {
                    let r = a.rem_euclid(p as i64) as u64;
                    if r == 0 {
                        0
                    } else if (1..p).any(|x| x * x % p == r) {
                        1
                    } else {
                        -1
                    }
                };
                assert_eq!(jacobi(a, &UBig::from(p)), expected, "({a}/{p})");
            }
        }
    }

    #[test]
    fn parse_rejects_everything_but_ascii_digits() {
        assert_eq!(parse_number("", 10), Err(NumberError::Empty));
        for bad in ["abc", "-7", "7.5", " 12 ", "1_0", "\u{663}", "+1", "0x10"] {
            assert!(
                matches!(parse_number(bad, 10), Err(NumberError::NotADigit { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_number("12345678901", 10),
            Err(NumberError::TooManyDigits {
                digits: 11,
                limit: 10
            })
        );
        assert_eq!(parse_number("000000000001", 10), Ok(Number::Small(1)));
        assert_eq!(parse_number("0", 10), Ok(Number::Small(0)));
    }

    #[test]
    fn cancelled_big_test_stops() {
        let cancel = Cancel::new();
        cancel.cancel();
        let n = parse_number(&((UBig::ONE << 4253) - UBig::ONE).to_string(), 5000).unwrap();
        assert_eq!(is_prime(&n, &cancel), Err(Cancelled));
    }
}
