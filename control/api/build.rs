//! Generates the discovery and identity types with protox (a pure-Rust protobuf compiler), so no system
//! `protoc` is needed on any machine that builds wasmesh.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/wasmesh/discovery/v1/discovery.proto",
        "proto/wasmesh/identity/v1/identity.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
