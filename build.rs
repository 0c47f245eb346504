//! Compiles the kernel fast path (`bpf/udp_offload.c`) with clang when clang is there.
//!
//! Without clang the build still succeeds: it prints a cargo warning, embeds an empty
//! object, and at run time `offload: ebpf` logs "offload unavailable: built without
//! clang" once and the listener runs in user space. `MEDIAGATE_BPF_CLANG` names another
//! clang binary; `MEDIAGATE_NO_BPF=1` skips the BPF build on purpose.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/udp_offload.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=bpf/turn_offload.h");
    println!("cargo:rerun-if-env-changed=MEDIAGATE_BPF_CLANG");
    println!("cargo:rerun-if-env-changed=MEDIAGATE_NO_BPF");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("udp_offload.o");
    let clang = std::env::var("MEDIAGATE_BPF_CLANG").unwrap_or_else(|_| "clang".into());
    let skip = std::env::var("MEDIAGATE_NO_BPF").is_ok_and(|v| v == "1");
    let arch_inc = format!(
        "-I/usr/include/{}-linux-gnu",
        std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()
    );
    let built = !skip
        && match Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", &arch_inc, "-c", src, "-o"])
            .arg(&out)
            .status()
        {
            Ok(s) if s.success() => true,
            Ok(s) => {
                println!(
                    "cargo:warning=kernel fast path not built: {clang} failed ({s}); install clang, llvm and libbpf-dev (scripts/install-test-deps.sh)"
                );
                false
            }
            Err(e) => {
                println!(
                    "cargo:warning=kernel fast path not built: {clang} not found ({e}); install clang, llvm and libbpf-dev (scripts/install-test-deps.sh)"
                );
                false
            }
        };
    if !built {
        std::fs::write(&out, b"").expect("write empty BPF object");
    }
}
