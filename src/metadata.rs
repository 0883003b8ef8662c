//! Response metadata keys that are part of dlb's public contract.

/// Every response carries `x-served-by: <instance id>`, the compute instance that did the work.
pub const SERVED_BY: &str = "x-served-by";

/// Responses through the gateway carry `x-attempts: <n>`, how many instances were tried.
pub const ATTEMPTS: &str = "x-attempts";

/// gRFC A6 server pushback, on a refusal: the call was not started, so it may be sent again
/// (after this many milliseconds to the same server). dlb's computes put it on a refusal
/// because their pool is full, and the gateway then sends the call to another instance at
/// once.
pub const RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

/// The longest instance id accepted (`--id`), in bytes; ids travel in metadata.
pub const MAX_INSTANCE_ID_LEN: usize = 64;

/// Checks that `id` can be an instance id: 1 to [`MAX_INSTANCE_ID_LEN`] ASCII letters, digits,
/// `-`, `_` or `.`, so it is always a valid header value and safe to show anywhere.
///
/// # Errors
///
/// A message saying what is wrong with `id`.
pub fn validate_instance_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("instance id must not be empty".to_owned());
    }
    if id.len() > MAX_INSTANCE_ID_LEN {
        return Err(format!(
            "instance id is {} bytes, over the limit of {MAX_INSTANCE_ID_LEN}",
            id.len()
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "instance id {id:?} contains {bad:?}; use ASCII letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_validated() {
        assert!(validate_instance_id("A").is_ok());
        assert!(validate_instance_id("compute-1.b_2").is_ok());
        assert!(validate_instance_id("").is_err());
        assert!(validate_instance_id("a b").is_err());
        assert!(validate_instance_id("<script>").is_err());
        assert!(validate_instance_id(&"x".repeat(65)).is_err());
    }
}
