//! Compiles `proto/*.proto` with protox (pure Rust, no system `protoc`) and
//! generates the prost types into `OUT_DIR`.

fn main() {
    println!("cargo:rerun-if-changed=proto/gossip.proto");
    let fds = protox::compile(["proto/gossip.proto"], ["proto"])
        .expect("proto/gossip.proto does not compile");
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("cannot generate Rust code from proto/gossip.proto");
}
