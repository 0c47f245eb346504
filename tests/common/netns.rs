//! Test hosts in network namespaces: a namespace reached from the root namespace over a
//! veth pair (`10.NET.IDX.1` on the host side, `10.NET.IDX.2` inside), removed on drop.

use std::net::Ipv4Addr;
use std::process::Command;

/// Runs a command (`ip`, `nft`) and fails the test with its stderr when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with one veth link to the root namespace.
pub struct VethHost {
    pub ns: String,
    pub host_dev: String,
    pub ns_dev: String,
    /// The address inside the namespace.
    pub addr: Ipv4Addr,
}

impl VethHost {
    /// Namespace `{name}{idx}` with devices `{dev}{idx}h` / `{dev}{idx}n` (at most 15
    /// characters) on 10.`net`.`idx`.0/24. Leftovers of an earlier run are removed first.
    pub fn create(name: &str, dev: &str, net: u8, idx: u8) -> VethHost {
        let h = VethHost {
            ns: format!("{name}{idx}"),
            host_dev: format!("{dev}{idx}h"),
            ns_dev: format!("{dev}{idx}n"),
            addr: Ipv4Addr::new(10, net, idx, 2),
        };
        h.cleanup();
        let (ns, hd, nd) = (&h.ns, &h.host_dev, &h.ns_dev);
        sh(&["ip", "netns", "add", ns]);
        sh(&[
            "ip", "link", "add", hd, "type", "veth", "peer", "name", nd, "netns", ns,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.{net}.{idx}.1/24"),
            "dev",
            hd,
        ]);
        sh(&["ip", "link", "set", hd, "up"]);
        h.exec(&["ip", "link", "set", "lo", "up"]);
        h.exec(&["ip", "addr", "add", &format!("{}/24", h.addr), "dev", nd]);
        h.exec(&["ip", "link", "set", nd, "up"]);
        h
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.ns];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// Takes the namespace's link down: its host neither answers nor refuses.
    pub fn cut(&self) {
        self.exec(&["ip", "link", "set", &self.ns_dev, "down"]);
    }

    fn cleanup(&self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_dev])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

impl Drop for VethHost {
    fn drop(&mut self) {
        self.cleanup();
    }
}
