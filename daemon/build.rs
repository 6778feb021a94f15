//! Nothing is generated here. The build-dependency on `protoc-bin-vendored` makes cargo fetch a
//! protoc before any build script runs, for etcd-client's (see `.cargo/config.toml` and
//! `tools/protoc`); naming it here keeps it a real dependency.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let _ = protoc_bin_vendored::protoc_bin_path();
}
