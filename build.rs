//! Compiles `proto/` into Rust with protox, so building dlb needs no system `protoc`.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/dlb/v1/operations.proto",
        "proto/dlb/v1/load.proto",
        "proto/dlb/v1/gateway.proto",
        "proto/dlb/v1/control.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection serves this descriptor set; compile_fds does not write one itself.
    std::fs::write(out_dir.join("dlb_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;

    // OTLP trace export (the client dlb exports with, and the server `dlb bench-suite`'s
    // receiver runs): compiled apart, so reflection never lists it.
    let otlp = "proto/otlp/trace_export.proto";
    println!("cargo:rerun-if-changed={otlp}");
    tonic_prost_build::configure().compile_fds(protox::compile([otlp], ["proto"])?)?;
    Ok(())
}
