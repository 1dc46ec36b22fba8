//! Sets `WEIR_VERSION`: `git describe --tags` of the checkout (a `vX.Y.Z` tag, and the
//! commits since it), or the Cargo package version outside a git checkout.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/tags");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let package = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let described = Command::new("git")
        .args(["describe", "--tags", "--match", "v[0-9]*"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().trim_start_matches('v').to_string())
        .filter(|s| !s.is_empty());
    println!(
        "cargo:rustc-env=WEIR_VERSION={}",
        described.unwrap_or(package)
    );
}
