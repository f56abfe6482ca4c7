//! Links the `shoal` binary as a position-dependent executable on Linux.
//!
//! Every client command is a short process, and a PIE of this size spends most
//! of its start in the dynamic loader: 41,000 relative relocations read from a
//! 1 MB table, and 160 pages of pointers copied on write to patch them. Linked
//! at a fixed address, none of that happens: `shoal --version` faults in 285
//! pages instead of 455, and `shoal job submit --wait -- true` ends about a
//! millisecond sooner (bench/RESULTS.md, issue 17 part 8). Go links its
//! binaries the same way by default (Nomad, Kubernetes); shared libraries,
//! the heap and the stacks are still placed at random.
fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
