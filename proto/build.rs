//! Compiles `proto/shoal.proto` with protox (pure Rust, no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/shoal.proto");
    let descriptors = protox::compile(["proto/shoal.proto"], ["proto"])?;
    // A launch's environment is a BTreeMap on both sides: the coordinator's
    // order moves into the message, and the agent's process gets it as it is.
    tonic_prost_build::configure()
        .btree_map(".shoal.v1.Launch.env")
        .compile_fds(descriptors)?;
    Ok(())
}
