//! Compiles the kernel fast path (`bpf/udp_offload.c`) with clang when clang is there.
//!
//! Without clang the build still succeeds: it prints a cargo warning, embeds an empty
//! object, and at run time `offload: ebpf` logs "offload unavailable: built without
//! clang" once and the listener runs in user space. `MEDIAGATE_BPF_CLANG` names another
//! clang binary; `MEDIAGATE_NO_BPF=1` skips the BPF build on purpose;
//! `MEDIAGATE_REQUIRE_BPF=1` (set by the Dockerfile) fails the build instead of embedding
//! an empty object.
//!
//! Clang appearing later (the README's two commands in their order: `cargo run -- demo`
//! on a fresh machine, then `scripts/test.sh` installs clang) is noticed: while clang is
//! missing, the script names a file that never exists among its inputs, so cargo runs it
//! again on every build until clang is found (and mediagate is compiled again each time:
//! the price of a machine without clang). The result is in `--version` and `mediagate_build_info`
//! (`MEDIAGATE_FAST_PATH`).

use std::path::PathBuf;
use std::process::Command;

/// Where `name` is on `PATH` (or `name` itself when it is a path), if anywhere.
fn find(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn main() {
    let src = "bpf/udp_offload.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=bpf/turn_offload.h");
    println!("cargo:rerun-if-changed=bpf/turn_offload6.h");
    println!("cargo:rerun-if-env-changed=MEDIAGATE_BPF_CLANG");
    println!("cargo:rerun-if-env-changed=MEDIAGATE_NO_BPF");
    println!("cargo:rerun-if-env-changed=MEDIAGATE_REQUIRE_BPF");
    println!("cargo:rerun-if-env-changed=PATH");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("udp_offload.o");
    let clang = std::env::var("MEDIAGATE_BPF_CLANG").unwrap_or_else(|_| "clang".into());
    let skip = std::env::var("MEDIAGATE_NO_BPF").is_ok_and(|v| v == "1");
    let require = std::env::var("MEDIAGATE_REQUIRE_BPF").is_ok_and(|v| v == "1");
    match find(&clang) {
        // A new or updated clang builds the object again.
        Some(path) => println!("cargo:rerun-if-changed={}", path.display()),
        // Not there: name a file that never exists, so that cargo runs this script on
        // every build until clang is found. Watching where clang would appear is not
        // enough: a package manager installs it with the package's (old) modification
        // time, and cargo takes an old file for an unchanged one.
        // (Not when the fast path is skipped on purpose.)
        None if !skip => println!(
            "cargo:rerun-if-changed={}",
            out.with_file_name("clang-not-found-yet").display()
        ),
        None => {}
    }
    let arch_inc = format!(
        "-I/usr/include/{}-linux-gnu",
        std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()
    );
    let why_not = if skip {
        Some("MEDIAGATE_NO_BPF=1".to_string())
    } else {
        match Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", &arch_inc, "-c", src, "-o"])
            .arg(&out)
            .status()
        {
            Ok(s) if s.success() => None,
            Ok(s) => Some(format!("{clang} failed ({s})")),
            Err(e) => Some(format!("{clang} not found ({e})")),
        }
    };
    match why_not {
        None => println!("cargo:rustc-env=MEDIAGATE_FAST_PATH=compiled in"),
        Some(why) => {
            if require {
                panic!(
                    "MEDIAGATE_REQUIRE_BPF=1 but the kernel fast path was not built: {why}; install clang, llvm and libbpf-dev"
                );
            }
            if !skip {
                println!(
                    "cargo:warning=kernel fast path not built: {why}; install clang, llvm and libbpf-dev (scripts/install-test-deps.sh)"
                );
            }
            println!("cargo:rustc-env=MEDIAGATE_FAST_PATH=not compiled in ({why})");
            std::fs::write(&out, b"").expect("write empty BPF object");
        }
    }
}
