//! Loader and validator tests: exact messages for broken files, `${VAR}` expansion,
//! defaults, and every shipped example in `config/`.

use super::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const FILE: &str = "t.yaml";

fn env(name: &str) -> Option<String> {
    match name {
        "TURN_SECRET" => Some("s3cret".to_string()),
        "PORT" => Some("5004".to_string()),
        "EMPTY" => Some(String::new()),
        "INJECT" => Some("x\nlisteners: []\n# y".to_string()),
        _ => None,
    }
}

fn load(text: &str) -> Result<Config, ConfigErrors> {
    load_str_with_env(text, FILE, &env)
}

fn load_ok(text: &str) -> Config {
    match load(text) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid configuration, got:\n{e}\n--- text:\n{text}"),
    }
}

/// One listener on 127.0.0.1:5004 to upstream `u` with a port-less server.
const MINIMAL: &str = "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\n";

/// (what is wrong, file text, every line `mediagate check` must print).
const BROKEN: &[(&str, &str, &[&str])] = &[
    (
        "empty file",
        "",
        &["t.yaml:1:1: the configuration file is empty"],
    ),
    (
        "only comments",
        "# nothing here\n",
        &["t.yaml:1:1: the configuration file is empty"],
    ),
    (
        "unclosed flow list",
        "listeners: [\n  - a\n",
        &[
            "t.yaml:1:12: invalid YAML: this `[` is not closed (the parser stopped at 2:3: \"-\" is only valid inside a block)",
        ],
    ),
    (
        "bad indentation",
        "admin:\n  listen: 127.0.0.1:1\n token: x\n",
        &["t.yaml:3:2: invalid YAML: while parsing a block mapping, did not find expected key"],
    ),
    (
        "tab indentation",
        "admin:\n\tlisten: x\n",
        &["t.yaml:2:2: invalid YAML: tabs disallowed within this context (block indentation)"],
    ),
    (
        "two documents",
        "admin: {}\n---\nlog: {}\n",
        &["t.yaml:2:1: more than one YAML document in the file (remove the second `---`)"],
    ),
    (
        "top level is a list",
        "- a\n- b\n",
        &["t.yaml:1:1: expected a mapping, found a list"],
    ),
    (
        "custom tag",
        "admin: !foo {}\n",
        &["t.yaml:1:8: admin: unsupported YAML tag !foo"],
    ),
    (
        "unknown top-level key",
        "listners: []\n",
        &[
            "t.yaml:1:1: listners: unknown key \"listners\" (expected one of: admin, log, listeners, upstreams, turn, discovery, shutdown, cluster, events)",
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
        ],
    ),
    (
        "unknown health key",
        "upstreams:\n  u:\n    primary: [127.0.0.1:6004]\n    health:\n      intervall: 1s\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:5:7: upstreams.u.health.intervall: unknown key \"intervall\" (expected one of: type, interval, timeout, fall, confirm, confirm_interval, adaptive_timeout, rise, port, path, expect_status, send, tls, tls_verify, tls_server_name, expect)",
        ],
    ),
    (
        "duplicate key",
        "admin:\n  listen: 127.0.0.1:8086\n  listen: 127.0.0.1:8087\n",
        &["t.yaml:3:3: admin.listen: duplicate key \"listen\" (first written on line 2)"],
    ),
    (
        "duplicate upstream name",
        "upstreams:\n  u:\n    primary: [127.0.0.1:1]\n  u:\n    primary: [127.0.0.1:2]\n",
        &["t.yaml:4:3: upstreams.u: duplicate key \"u\" (first written on line 2)"],
    ),
    (
        "missing required key",
        "listeners:\n  - name: a\n    protocol: udp\n    listen: 127.0.0.1:5004\n",
        &["t.yaml:2:5: listeners[0]: missing required key \"upstream\""],
    ),
    (
        "turn without auth",
        "turn:\n  public_address: 1.2.3.4\n  listeners: []\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:2:3: turn: missing required key \"auth\"",
        ],
    ),
    (
        "integer field given a word",
        "upstreams:\n  u:\n    primary: [127.0.0.1:6004]\n    health: { fall: many }\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:4:21: upstreams.u.health.fall: expected an integer from 0 to 4294967295, found \"many\"",
        ],
    ),
    (
        "negative port",
        "upstreams:\n  u:\n    primary: [127.0.0.1:1]\n    health: { port: -1 }\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:4:21: upstreams.u.health.port: invalid value -1: expected an integer from 0 to 65535",
        ],
    ),
    (
        "boolean given yes",
        "upstreams:\n  u:\n    primary: [127.0.0.1:1]\n    passive: yes\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:4:14: upstreams.u.passive: expected a boolean, found \"yes\"",
        ],
    ),
    (
        "string given a list",
        "listeners:\n  - name: [a]\n",
        &["t.yaml:2:11: listeners[0].name: expected a string, found a list"],
    ),
    (
        "list given a string",
        "upstreams:\n  u:\n    primary: 127.0.0.1:1\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:3:14: upstreams.u.primary: expected a list, found \"127.0.0.1:1\"",
        ],
    ),
    (
        "bad protocol",
        "listeners:\n  - name: a\n    protocol: sctp\n    listen: 127.0.0.1:5004\n    upstream: u\n",
        &["t.yaml:3:15: listeners[0].protocol: unknown value \"sctp\" (expected one of: tcp, udp)"],
    ),
    (
        "bad balance",
        "upstreams:\n  u:\n    primary: [127.0.0.1:1]\n    balance: random\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:4:14: upstreams.u.balance: unknown value \"random\" (expected one of: first, hash, round_robin, least_sessions)",
        ],
    ),
    (
        "enum given a list",
        "log:\n  format: [json]\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:2:11: log.format: expected one of: text, json, found a list",
        ],
    ),
    (
        "bad duration",
        "upstreams:\n  u:\n    primary: [127.0.0.1:6004]\n    health:\n      interval: 10 mss\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:5:17: upstreams.u.health.interval: invalid duration \"10 mss\"",
        ],
    ),
    (
        "duration with a space",
        "upstreams:\n  u:\n    primary: [127.0.0.1:6004]\n    health:\n      interval: 10 ms\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:5:17: upstreams.u.health.interval: invalid duration \"10 ms\"",
        ],
    ),
    (
        "duration without unit",
        "shutdown:\n  drain_timeout: 5\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:2:18: shutdown.drain_timeout: invalid duration \"5\"",
        ],
    ),
    (
        "listen port out of range",
        "listeners:\n  - name: a\n    protocol: udp\n    listen: 127.0.0.1:70000\n    upstream: u\n",
        &[
            "t.yaml:4:13: listeners[0].listen: invalid port \"70000\" in listen address \"127.0.0.1:70000\"",
        ],
    ),
    (
        "listen port 0",
        "listeners:\n  - name: a\n    protocol: udp\n    listen: 127.0.0.1:0\n    upstream: u\n",
        &["t.yaml:4:13: listeners[0].listen: invalid port \"0\" in listen address \"127.0.0.1:0\""],
    ),
    (
        "reversed port range",
        "listeners:\n  - name: a\n    protocol: udp\n    listen: 0.0.0.0:5010-5004\n    upstream: u\n",
        &[
            "t.yaml:4:13: listeners[0].listen: invalid port range \"5010-5004\" in listen address \"0.0.0.0:5010-5004\" (first port above last)",
        ],
    ),
    (
        "bad relay port range",
        "turn:\n  public_address: 1.2.3.4\n  listeners: []\n  auth: { type: ephemeral, secret: x }\n  relay: { port_range: 0-100 }\n",
        &[
            "t.yaml:3:14: turn.listeners: no TURN listeners (add at least one)",
            "t.yaml:5:24: turn.relay.port_range: invalid port range \"0-100\" (expected first-last)",
        ],
    ),
    (
        "bad server address",
        "upstreams:\n  u:\n    primary: [10.0.0.300:5]\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:3:15: upstreams.u.primary[0]: invalid server address \"10.0.0.300:5\"",
        ],
    ),
    (
        "bad admin address",
        "admin:\n  listen: localhost:8086\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:2:11: admin.listen: invalid address \"localhost:8086\" (expected ip:port)",
        ],
    ),
    (
        "bad relay IP",
        "turn:\n  public_address: 1.2.3.4\n  listeners: []\n  auth: {type: ephemeral, secret: x}\n  relay: { address: 1.2.3 }\n",
        &[
            "t.yaml:3:14: turn.listeners: no TURN listeners (add at least one)",
            "t.yaml:5:21: turn.relay.address: invalid IP address \"1.2.3\"",
        ],
    ),
    (
        "missing environment variable",
        "admin:\n  token: ${MEDIAGATE_ADMIN_TOKEN}\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:2:10: admin.token: environment variable MEDIAGATE_ADMIN_TOKEN is not set",
        ],
    ),
    (
        "nothing to serve, admin port 0, empty token",
        "admin: { listen: 127.0.0.1:0, token: '' }\n",
        &[
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:1:18: admin.listen: port 0 is not allowed",
            "t.yaml:1:38: admin.token: the token is empty (remove the key to leave the POST endpoints open)",
        ],
    ),
    (
        "token from an empty variable",
        "admin: { token: '${EMPTY}' }\nlisteners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\n",
        &[
            "t.yaml:1:17: admin.token: the token is empty (remove the key to leave the POST endpoints open)",
        ],
    ),
    (
        "bad log level",
        "log:\n  level: verbose\nlisteners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\n",
        &[
            "t.yaml:2:10: log.level: invalid log level \"verbose\" (expected one of: trace, debug, info, warn, error, off; or directives such as info,mediagate=debug)",
        ],
    ),
    (
        "bad names",
        "listeners:\n  - { name: 'a b', protocol: udp, listen: 127.0.0.1:5004, upstream: u/x }\nupstreams:\n  u/x: { primary: [127.0.0.1] }\n",
        &[
            "t.yaml:2:13: listeners[0].name: invalid name \"a b\" (use letters, digits, '.', '-' and '_')",
            "t.yaml:4:8: upstreams.u/x: invalid name \"u/x\" (use letters, digits, '.', '-' and '_')",
        ],
    ),
    (
        "duplicate listener name",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\n  - { name: a, protocol: udp, listen: 127.0.0.1:5005, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\n",
        &["t.yaml:3:13: listeners[1].name: duplicate listener name \"a\" (also listeners[0])"],
    ),
    (
        "duplicate server across primary and backup",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u:\n    primary: [127.0.0.1:6004]\n    backup: [127.0.0.1:6005, 127.0.0.1:6004]\n",
        &["t.yaml:6:30: upstreams.u.backup[1]: duplicate server 127.0.0.1:6004 (also primary[0])"],
    ),
    (
        "listener names a missing upstream",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: janus }\nupstreams:\n  u: { primary: [127.0.0.1:1] }\n  v: { primary: [127.0.0.1:2] }\n",
        &["t.yaml:2:65: listeners[0].upstream: unknown upstream \"janus\" (defined: u, v)"],
    ),
    (
        "listener names an upstream when none exist",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: janus }\n",
        &[
            "t.yaml:2:65: listeners[0].upstream: unknown upstream \"janus\" (no upstreams are defined)",
        ],
    ),
    (
        "upstream without servers",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u:\n    balance: first\n",
        &["t.yaml:5:5: upstreams.u: no servers (primary and backup are both empty)"],
    ),
    (
        "overlapping listeners of one protocol",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5006, upstream: u }\n  - { name: b, protocol: tcp, listen: 127.0.0.1:5006, upstream: u }\n  - { name: c, protocol: udp, listen: 0.0.0.0:5004-5010, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\n",
        &[
            "t.yaml:4:39: listeners[2].listen: udp 0.0.0.0:5004-5010 overlaps udp 127.0.0.1:5006 of listeners[0] \"a\"",
        ],
    ),
    (
        "listener on the admin address",
        "admin: { listen: 0.0.0.0:8080 }\nlisteners:\n  - { name: a, protocol: tcp, listen: 127.0.0.1:8080, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\n",
        &[
            "t.yaml:3:39: listeners[0].listen: tcp 127.0.0.1:8080 overlaps tcp 0.0.0.0:8080 of admin.listen",
        ],
    ),
    (
        "TURN listener on a listener's port",
        "listeners:\n  - { name: a, protocol: udp, listen: 0.0.0.0:3478, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\nturn:\n  public_address: 203.0.113.7\n  listeners:\n    - { protocol: udp, listen: 0.0.0.0:3478 }\n    - { protocol: tcp, listen: 0.0.0.0:3478 }\n  auth: { type: ephemeral, secret: x }\n",
        &[
            "t.yaml:8:32: turn.listeners[0].listen: udp 0.0.0.0:3478 overlaps udp 0.0.0.0:3478 of listeners[0] \"a\"",
        ],
    ),
    (
        "relay port range over a listener",
        "listeners:\n  - { name: a, protocol: udp, listen: 0.0.0.0:50000, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\nturn:\n  public_address: 203.0.113.7\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth: { type: ephemeral, secret: x }\n",
        &[
            "t.yaml:6:3: turn.relay.port_range: udp 0.0.0.0:49152-65535 overlaps udp 0.0.0.0:50000 of listeners[0] \"a\"",
        ],
    ),
    (
        "timeout longer than interval",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u:\n    primary: [127.0.0.1]\n    health:\n      interval: 100ms\n      timeout: 150ms\n",
        &[
            "t.yaml:8:16: upstreams.u.health.timeout: timeout 150ms is longer than interval 100ms (a probe must finish before the next one)",
        ],
    ),
    (
        "default timeout longer than a short interval",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u:\n    primary: [127.0.0.1]\n    health:\n      interval: 200ms\n",
        &[
            "t.yaml:7:7: upstreams.u.health.timeout: timeout 500ms is longer than interval 200ms (a probe must finish before the next one)",
        ],
    ),
    (
        "zero connection caps and header timeout",
        "admin: { max_connections: 0, header_read_timeout: 0s }\nlisteners:\n  - { name: a, protocol: tcp, listen: 127.0.0.1:5004, upstream: u, max_connections: 0 }\nupstreams:\n  u:\n    primary: [127.0.0.1]\n",
        &[
            "t.yaml:1:27: admin.max_connections: must be at least 1",
            "t.yaml:1:51: admin.header_read_timeout: must be longer than 0s",
            "t.yaml:3:85: listeners[0].max_connections: must be at least 1",
        ],
    ),
    (
        "zero durations and counts",
        "listeners:\n  - name: a\n    protocol: udp\n    listen: 127.0.0.1:5004\n    upstream: u\n    session: { idle_timeout: 0s, max_sessions: 0 }\nupstreams:\n  u:\n    primary: [127.0.0.1]\n    connect_timeout: 0s\n    health: { interval: 0s, timeout: 0ms, fall: 0, rise: 0, port: 0 }\n",
        &[
            "t.yaml:6:30: listeners[0].session.idle_timeout: must be longer than 0s",
            "t.yaml:6:48: listeners[0].session.max_sessions: must be at least 1",
            "t.yaml:10:22: upstreams.u.connect_timeout: must be longer than 0s",
            "t.yaml:11:25: upstreams.u.health.interval: must be longer than 0s",
            "t.yaml:11:38: upstreams.u.health.timeout: must be longer than 0s",
            "t.yaml:11:49: upstreams.u.health.fall: must be at least 1",
            "t.yaml:11:58: upstreams.u.health.rise: must be at least 1",
            "t.yaml:11:67: upstreams.u.health.port: port 0 is not allowed",
        ],
    ),
    (
        "port-less servers in an upstream no listener uses",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\n  spare: { primary: [10.0.0.1, janus.example.org, janus.example.org:80] }\n",
        &[
            "t.yaml:5:22: upstreams.spare.primary[0]: server 10.0.0.1 has no port, and no listener uses upstream \"spare\" to supply one",
            "t.yaml:5:32: upstreams.spare.primary[1]: server janus.example.org has no port, and no listener uses upstream \"spare\" to supply one",
        ],
    ),
    (
        "explicit port behind a port range",
        "listeners:\n  - { name: rtp, protocol: udp, listen: 0.0.0.0:5004-5010, upstream: u }\nupstreams:\n  u:\n    primary: [10.0.0.1:5004]\n    backup: [10.0.0.2]\n",
        &[
            "t.yaml:5:15: upstreams.u.primary[0]: server 10.0.0.1:5004 has a port, but listeners[0] \"rtp\" listens on the port range 0.0.0.0:5004-5010, which forwards each port to the same port on the server; remove the port",
        ],
    ),
    (
        "node servers without kubernetes block or discovery",
        "listeners:\n  - { name: rtp, protocol: udp, listen: 0.0.0.0:5004, upstream: u }\nupstreams:\n  u:\n    primary: [node/worker-1]\n    backup: [node/*]\n",
        &[
            "t.yaml:5:15: upstreams.u.primary[0]: node/worker-1 needs a kubernetes block (namespace, service) in upstream \"u\"",
            "t.yaml:5:15: upstreams.u.primary[0]: node/worker-1 needs discovery.kubernetes.enabled: true",
            "t.yaml:6:14: upstreams.u.backup[0]: node/* needs a kubernetes block (namespace, service) in upstream \"u\"",
            "t.yaml:6:14: upstreams.u.backup[0]: node/* needs discovery.kubernetes.enabled: true",
        ],
    ),
    (
        "node server with kubernetes discovery off",
        "listeners:\n  - { name: rtp, protocol: udp, listen: 0.0.0.0:5004, upstream: u }\nupstreams:\n  u:\n    primary: [node/worker-1]\n    kubernetes: { namespace: media, service: janus }\n",
        &[
            "t.yaml:5:15: upstreams.u.primary[0]: node/worker-1 needs discovery.kubernetes.enabled: true",
        ],
    ),
    (
        "kubernetes block: empty namespace, port behind a range",
        "discovery: { kubernetes: { enabled: true } }\nlisteners:\n  - { name: rtp, protocol: udp, listen: 0.0.0.0:5004-5005, upstream: u }\nupstreams:\n  u:\n    primary: [node/worker-1]\n    kubernetes: { namespace: '', service: janus, port: 5004 }\n",
        &[
            "t.yaml:7:30: upstreams.u.kubernetes.namespace: the namespace is empty",
            "t.yaml:7:56: upstreams.u.kubernetes.port: port 5004 conflicts with listeners[0] \"rtp\", whose port range 0.0.0.0:5004-5005 forwards each port to the same port on the server; remove the port",
        ],
    ),
    (
        "http health: relative path, impossible status",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u:\n    primary: [127.0.0.1]\n    health: { type: http, path: janus/info, expect_status: 600 }\n",
        &[
            "t.yaml:6:33: upstreams.u.health.path: the HTTP path must start with \"/\" (got \"janus/info\")",
            "t.yaml:6:60: upstreams.u.health.expect_status: 600 is not an HTTP status (100-599)",
        ],
    ),
    (
        "https health: a TLS server name that is no name",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u:\n    primary: [127.0.0.1]\n    health: { type: http, tls: true, tls_server_name: \"bad name!\" }\n",
        &["t.yaml:6:55: upstreams.u.health.tls_server_name: invalid TLS server name \"bad name!\""],
    ),
    (
        "udp health with nothing to send",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u:\n    primary: [127.0.0.1]\n    health: { type: udp, send: '' }\n",
        &[
            "t.yaml:6:32: upstreams.u.health.send: the probe payload is empty (a UDP probe must send something)",
        ],
    ),
    (
        "ephemeral auth without secret",
        "turn:\n  public_address: 203.0.113.7\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth:\n    type: ephemeral\n    ttl: 0s\n    users: [{ username: a, password: b }]\n",
        &[
            "t.yaml:5:5: turn.auth.secret: auth type ephemeral needs a secret (or secrets)",
            "t.yaml:6:10: turn.auth.ttl: must be longer than 0s",
            "t.yaml:7:12: turn.auth.users: users are only used with auth type static (remove them, or set type: static)",
        ],
    ),
    (
        "secret and secrets, tls without cert, proxy protocol on udp",
        "turn:\n  public_address: 203.0.113.7\n  listeners:\n    - { protocol: tls, listen: 0.0.0.0:443 }\n    - { protocol: udp, listen: 0.0.0.0:3478, cert: c.pem, accept_proxy_protocol: true }\n  auth:\n    type: ephemeral\n    secret: a\n    secrets: [b, '']\n  ice:\n    cors_origins: ['https://ok.example', 'ftp://x/', 'https://a.example/path']\n    token: t\nadmin:\n  token: t\n",
        &[
            "t.yaml:4:7: turn.listeners[0].cert: a tls listener needs cert (a PEM file path)",
            "t.yaml:4:7: turn.listeners[0].key: a tls listener needs key (a PEM file path)",
            "t.yaml:5:52: turn.listeners[1].cert: cert is only used with protocol tcp, tls or dtls",
            "t.yaml:5:82: turn.listeners[1].accept_proxy_protocol: PROXY protocol is only accepted on tcp and tls listeners",
            "t.yaml:9:14: turn.auth.secrets: set either secret or secrets, not both (secret is a one-element secrets)",
            "t.yaml:9:18: turn.auth.secrets[1]: the secret is empty",
            "t.yaml:11:42: turn.ice.cors_origins[1]: invalid origin \"ftp://x/\" (expected scheme://host[:port] without a path, or *)",
            "t.yaml:11:54: turn.ice.cors_origins[2]: invalid origin \"https://a.example/path\" (expected scheme://host[:port] without a path, or *)",
            "t.yaml:12:12: turn.ice.token: the /ice token must differ from admin.token (it is handed to web pages)",
        ],
    ),
    (
        "static auth without users",
        "turn:\n  public_address: 203.0.113.7\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth:\n    type: static\n    secret: x\n",
        &[
            "t.yaml:5:5: turn.auth.users: auth type static needs at least one user",
            "t.yaml:6:13: turn.auth.secret: a secret is only used with auth type ephemeral (remove it, or set type: ephemeral)",
        ],
    ),
    (
        "static users: empty and duplicate",
        "turn:\n  public_address: 203.0.113.7\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth:\n    type: static\n    users:\n      - { username: '', password: p }\n      - { username: bob, password: '' }\n      - { username: bob, password: x }\n",
        &[
            "t.yaml:7:21: turn.auth.users[0].username: the username is empty",
            "t.yaml:8:36: turn.auth.users[1].password: the password is empty",
            "t.yaml:9:21: turn.auth.users[2].username: duplicate user \"bob\" (also turn.auth.users[1])",
        ],
    ),
    (
        "TURN without listeners, address, peers or quota",
        "turn:\n  public_address: ''\n  listeners: []\n  auth: { type: ephemeral, secret: x }\n  relay:\n    peers: [upstreams, self, 10.0.0.0/8, 10.0.0.0/33, fd00::1, everyone]\n  quota: { allocations_per_user: 0, max_allocations: 0, max_tcp_connections: 0 }\n",
        &[
            "t.yaml:2:19: turn.public_address: the public address is empty",
            "t.yaml:3:14: turn.listeners: no TURN listeners (add at least one)",
            "t.yaml:6:42: turn.relay.peers[3]: invalid peer \"10.0.0.0/33\" (expected upstreams, self, an IP address or a CIDR)",
            "t.yaml:6:64: turn.relay.peers[5]: invalid peer \"everyone\" (expected upstreams, self, an IP address or a CIDR)",
            "t.yaml:7:34: turn.quota.allocations_per_user: must be at least 1",
            "t.yaml:7:54: turn.quota.max_allocations: must be at least 1",
            "t.yaml:7:78: turn.quota.max_tcp_connections: must be at least 1",
        ],
    ),
    (
        "TURN per-source caps and handshake timeout of zero",
        "turn:\n  public_address: 192.0.2.1\n  listeners: [{ protocol: udp, listen: '0.0.0.0:3478' }]\n  auth: { type: ephemeral, secret: x }\n  quota: { max_connections_per_source: 0, max_handshakes_per_source: 0, handshake_timeout: 0s }\n",
        &[
            "t.yaml:5:40: turn.quota.max_connections_per_source: must be at least 1",
            "t.yaml:5:70: turn.quota.max_handshakes_per_source: must be at least 1",
            "t.yaml:5:92: turn.quota.handshake_timeout: must be longer than 0s",
        ],
    ),
    (
        "TURN public address 0.0.0.0",
        "turn:\n  public_address: 0.0.0.0\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth: { type: ephemeral, secret: x }\n",
        &[
            "t.yaml:2:19: turn.public_address: 0.0.0.0 is not an address clients can reach (use the public IP)",
        ],
    ),
    (
        "TURN public addresses: two of one family, then three",
        "turn:\n  public_address: [1.2.3.4, 5.6.7.8]\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth: { type: ephemeral, secret: x }\n",
        &[
            "t.yaml:2:19: turn.public_address: [1.2.3.4, 5.6.7.8]: two entries must be an IPv4 and an IPv6 address (one host name with both A and AAAA records serves both families alone)",
        ],
    ),
    (
        "TURN public addresses: three",
        "turn:\n  public_address: [1.2.3.4, '2001:db8::1', turn.example.org]\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth: { type: ephemeral, secret: x }\n",
        &[
            "t.yaml:2:19: turn.public_address: 3 addresses: give one IP address or host name, or an IPv4 and an IPv6 address",
        ],
    ),
    (
        "TURN address with port, empty realm, port 0, empty secret",
        "turn:\n  public_address: 1.2.3.4:3478\n  realm: ''\n  listeners: [{ protocol: udp, listen: 0.0.0.0:0 }]\n  auth: { type: ephemeral, secret: '' }\n",
        &[
            "t.yaml:2:19: turn.public_address: invalid public address \"1.2.3.4:3478\" (expected an IP address or a host name, without a port)",
            "t.yaml:3:10: turn.realm: the realm is empty",
            "t.yaml:4:40: turn.listeners[0].listen: port 0 is not allowed",
            "t.yaml:5:36: turn.auth.secret: the secret is empty",
        ],
    ),
    (
        "DNS min_ttl above max_ttl, nameserver port 0",
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\ndiscovery:\n  dns:\n    nameservers: [127.0.0.1:0]\n    min_ttl: 1m\n    max_ttl: 30s\n",
        &[
            "t.yaml:7:19: discovery.dns.nameservers[0]: port 0 is not allowed",
            "t.yaml:8:14: discovery.dns.min_ttl: min_ttl 1m is longer than max_ttl 30s",
        ],
    ),
    (
        "an unclosed flow bracket is pointed at, not where the parser gave up",
        "admin:\n  listen: 127.0.0.1:9\nlisteners: [ { name: a, protocol: udp, listen: 127.0.0.1:5000, upstream: u }\nupstreams:\n  u:\n    primary: [10.0.0.1:5]\n",
        &[
            "t.yaml:3:12: invalid YAML: this `[` is not closed (the parser stopped at 4:1: invalid indentation in flow construct)",
        ],
    ),
    (
        "keys that mean nothing where they are written",
        "listeners:\n  - { name: a, protocol: udp, listen: 0.0.0.0:5000, upstream: u, max_connections: 9 }\nupstreams:\n  u:\n    primary: [10.0.0.1]\n    health: { type: udp, expect_status: 204, path: /x, send: ping }\n  v:\n    primary: [10.0.0.2:80]\n    health: { type: http, tls_server_name: janus.example, expect: pong }\n",
        &[
            "t.yaml:2:83: listeners[0].max_connections: max_connections is for tcp listeners; a UDP listener is bounded by session.max_sessions",
            "t.yaml:6:41: upstreams.u.health.expect_status: expect_status is for http probes (this one is udp)",
            "t.yaml:6:52: upstreams.u.health.path: path is for http probes (this one is udp)",
            "t.yaml:9:44: upstreams.v.health.tls_server_name: tls_server_name needs tls: true",
            "t.yaml:9:67: upstreams.v.health.expect: expect is for udp probes (this one is http)",
        ],
    ),
];

#[test]
fn broken_configurations_give_exact_messages() {
    assert!(BROKEN.len() >= 30);
    let mut failures = Vec::new();
    for (what, text, expected) in BROKEN {
        let got = match load(text) {
            Ok(_) => "<loaded without error>".to_string(),
            Err(e) => e.to_string(),
        };
        let expected = expected.join("\n");
        if got != expected {
            failures.push(format!(
                "{what}:\n  expected: {expected}\n  got:      {got}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn errors_carry_structured_fields() {
    let Err(ConfigErrors(errors)) = load(
        "listeners: [{ name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }]\nupstreams:\n  u:\n    primary: [127.0.0.1:6004]\n    health:\n      interval: 10 mss\n",
    ) else {
        panic!("expected an error");
    };
    assert_eq!(
        errors,
        vec![ConfigError {
            file: FILE.to_string(),
            line: Some(6),
            column: Some(17),
            path: "upstreams.u.health.interval".to_string(),
            message: "invalid duration \"10 mss\"".to_string(),
        }]
    );
}

#[test]
fn unreadable_file_is_one_error_without_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.yaml");
    let Err(ConfigErrors(errors)) = load_file(&missing) else {
        panic!("expected an error");
    };
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, None);
    let shown = errors[0].to_string();
    assert!(
        shown.starts_with(&format!("{}: cannot read the file: ", missing.display())),
        "{shown}"
    );
}

#[test]
fn load_file_reads_and_labels() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("m.yaml");
    std::fs::write(&path, MINIMAL).expect("write");
    assert!(load_file(&path).is_ok());
    std::fs::write(&path, "log: { format: xml }\n").expect("write");
    let Err(e) = load_file(&path) else {
        panic!("expected an error")
    };
    assert_eq!(
        e.to_string(),
        format!(
            "{p}:1:1: listeners: no listeners and no turn section: there is nothing to serve\n\
             {p}:1:16: log.format: unknown value \"xml\" (expected one of: text, json)",
            p = path.display()
        )
    );
}

#[test]
fn env_variables_expand_in_values() {
    let c = load_ok(
        "admin: { token: \"${TURN_SECRET}-$${NOT_A_VAR}\" }\nlisteners:\n  - { name: a, protocol: udp, listen: '127.0.0.1:${PORT}', upstream: u }\nupstreams:\n  u:\n    primary: [127.0.0.1]\n    health: { port: '${PORT}' }\n",
    );
    assert_eq!(c.admin.token.as_deref(), Some("s3cret-${NOT_A_VAR}"));
    assert_eq!(c.listeners[0].listen.first_port, 5004);
    // A variable in a number field is read as that number.
    assert_eq!(c.upstreams["u"].health.port, Some(5004));
}

#[test]
fn env_value_cannot_inject_structure() {
    // Block style: in a flow mapping `{ }` an unquoted `${...}` is not valid YAML.
    let c = load_ok(&format!("admin:\n  token: ${{INJECT}}\n{MINIMAL}"));
    assert_eq!(c.admin.token.as_deref(), Some("x\nlisteners: []\n# y"));
    assert_eq!(c.listeners.len(), 1);
}

#[test]
fn env_errors_are_all_reported_and_keys_are_not_expanded() {
    let e = load(
        "admin: { token: '${A1}${A2}' }\nlog: { level: '${1BAD}' }\nupstreams:\n  ${NOT_EXPANDED}: { primary: ['${A3}'] }\n",
    )
    .expect_err("variables are missing");
    assert_eq!(
        e.to_string(),
        [
            "t.yaml:1:1: listeners: no listeners and no turn section: there is nothing to serve",
            "t.yaml:1:17: admin.token: environment variable A1 is not set",
            "t.yaml:1:17: admin.token: environment variable A2 is not set",
            "t.yaml:2:15: log.level: invalid environment variable name \"1BAD\" in \"${1BAD}\" (write $${ for a literal ${)",
            "t.yaml:4:32: upstreams.${NOT_EXPANDED}.primary[0]: environment variable A3 is not set",
        ]
        .join("\n")
    );
}

#[test]
fn process_environment_is_used_by_load_str() {
    // PATH is set in any environment the tests run in; no variable is modified here.
    let e = load_str("admin: { token: '${PATH}', listen: 127.0.0.1:0 }\n", FILE)
        .expect_err("port 0 and nothing to serve");
    assert!(!e.to_string().contains("PATH is not set"), "{e}");
}

#[test]
fn every_default() {
    let c = load_ok(MINIMAL);
    assert_eq!(
        c.admin.listen,
        "127.0.0.1:8086".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.admin.token, None);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Text);
    let l = &c.listeners[0];
    assert_eq!(l.session.idle_timeout.get(), Duration::from_secs(60));
    assert_eq!(l.session.max_sessions, 100_000);
    assert_eq!(l.session.new_per_source_per_second, 200);
    assert_eq!(l.session.max_per_source, 10_000);
    assert_eq!(l.max_connections, 10_000);
    assert_eq!(l.offload, super::types::Offload::None);
    assert_eq!(c.admin.max_connections, 128);
    assert_eq!(c.admin.header_read_timeout.get(), Duration::from_secs(5));
    let u = &c.upstreams["u"];
    assert_eq!(u.backup, Vec::new());
    assert_eq!(u.balance, Balance::First);
    assert_eq!(u.failback, Failback::NewSessions);
    assert_eq!(u.failback_delay.get(), Duration::ZERO);
    assert!(u.passive);
    assert_eq!(u.passive_scope, PassiveScope::Protocol);
    assert_eq!(u.connect_timeout.get(), Duration::from_secs(1));
    assert_eq!(u.kubernetes, None);
    let h = &u.health;
    assert_eq!(h.kind, HealthType::Tcp);
    assert_eq!(h.interval.get(), Duration::from_secs(1));
    assert_eq!(h.timeout.get(), Duration::from_millis(500));
    assert_eq!((h.fall, h.rise), (1, 2));
    assert_eq!(h.port, None);
    assert_eq!(h.path, "/");
    assert_eq!(h.expect_status, 200);
    assert_eq!(h.send, "ping");
    assert_eq!(h.expect, None);
    assert_eq!(c.turn, None);
    assert!(c.discovery.dns.nameservers.is_empty());
    assert_eq!(c.discovery.dns.min_ttl.get(), Duration::from_secs(1));
    assert_eq!(c.discovery.dns.max_ttl.get(), Duration::from_secs(30));
    assert!(!c.discovery.kubernetes.enabled);
    assert_eq!(c.shutdown.drain_timeout.get(), Duration::from_secs(30));

    // The `Default` impls other modules use agree with what an absent key gives.
    assert_eq!(c.admin, AdminConfig::default());
    assert_eq!(c.log, LogConfig::default());
    assert_eq!(l.session, SessionConfig::default());
    assert_eq!(*h, HealthConfig::default());
    assert_eq!(c.discovery, DiscoveryConfig::default());
    assert_eq!(c.shutdown, ShutdownConfig::default());
}

#[test]
fn turn_defaults() {
    let c = load_ok(
        "turn:\n  public_address: turn.example.org\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth: { type: ephemeral, secret: '${TURN_SECRET}' }\n",
    );
    let t = c.turn.expect("turn section");
    assert_eq!(t.realm, "mediagate");
    assert_eq!(t.auth.kind, TurnAuthType::Ephemeral);
    assert_eq!(t.auth.secret.as_deref(), Some("s3cret"));
    assert_eq!(t.auth.ttl.get(), Duration::from_secs(24 * 3600));
    assert!(t.auth.users.is_empty());
    assert_eq!(t.relay, RelayConfig::default());
    assert_eq!(t.relay.address.to_string(), "0.0.0.0");
    assert_eq!(t.relay.address.family(false), None);
    assert_eq!(
        t.relay.port_range,
        PortRange {
            first: 49152,
            last: 65535
        }
    );
    assert_eq!(t.relay.peers, vec!["upstreams".to_string()]);
    assert_eq!(t.quota.allocations_per_user, 10);
    assert_eq!(t.quota.max_allocations, 10_000);
    assert_eq!(t.quota.max_tcp_connections, 4096);
    assert_eq!(t.quota.max_connections_per_source, 256);
    assert_eq!(t.quota.max_handshakes_per_source, 16);
    assert_eq!(t.quota.handshake_timeout.0, Duration::from_secs(5));
}

#[test]
fn good_configurations_load() {
    let good = [
        // TCP and UDP on one port; timeout equal to interval; a short log directive list.
        "log: { level: 'info,mediagate::health=DEBUG' }\nlisteners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\n  - { name: b, protocol: tcp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1], health: { interval: 100ms, timeout: 100ms } }\n",
        // Empty blocks mean defaults; a null backup is an empty list; humantime spacing.
        "listeners:\n  - name: a\n    protocol: udp\n    listen: '[::1]:5004'\n    upstream: u\n    session:\nupstreams:\n  u:\n    primary: ['[fd00::1]:5004', '[fd00::2]']\n    backup:\n    health:\n    failback_delay: 2m 30s\n",
        // TURN only (headless); static users; CIDR and IP peers.
        "turn:\n  public_address: 203.0.113.7\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }, { protocol: tcp, listen: 0.0.0.0:3478 }]\n  auth: { type: static, users: [{ username: alice, password: 12345 }] }\n  relay: { peers: [self, 10.0.0.0/8, 'fd00::/8', 192.0.2.1] }\n",
        // Anchors and aliases share a health block; a port-range listener with port-less servers.
        "listeners:\n  - { name: rtp, protocol: udp, listen: 0.0.0.0:5004-5010, upstream: rtp }\n  - { name: http, protocol: tcp, listen: 0.0.0.0:8088, upstream: http }\nupstreams:\n  rtp: { primary: [10.0.0.1], backup: [janus-b.example.org], health: &h { type: http, port: 8088, path: /janus/info } }\n  http: { primary: [10.0.0.1:8088], health: *h }\n",
        // Kubernetes servers with discovery on; an unused upstream whose servers have ports.
        "discovery: { kubernetes: { enabled: true } }\nlisteners:\n  - { name: a, protocol: udp, listen: 0.0.0.0:5004, upstream: u }\nupstreams:\n  u: { primary: [node/a], backup: [node/*], kubernetes: { namespace: m, service: s } }\n  spare: { primary: [node/*], kubernetes: { namespace: m, service: s, port: 99 } }\n",
    ];
    for text in good {
        load_ok(text);
    }
    let c = load_ok(good[2]);
    let t = c.turn.expect("turn");
    assert_eq!(t.auth.users[0].password, "12345");
    let c = load_ok(good[3]);
    assert_eq!(c.upstreams["http"].health, c.upstreams["rtp"].health);
    assert_eq!(c.upstreams["rtp"].health.kind, HealthType::Http);
}

/// Every `${NAME}` in `text`, outside comments, with `$${` escapes skipped.
fn referenced_variables(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let line = line.split(" #").next().unwrap_or("");
        if line.trim_start().starts_with('#') {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("${") {
            let escaped = i > 0 && rest.as_bytes()[i - 1] == b'$';
            let tail = &rest[i + 2..];
            let end = tail.find('}').unwrap_or(tail.len());
            if !escaped {
                names.insert(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    names
}

#[test]
fn shipped_examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable example");
        let vars = referenced_variables(&text);
        // Plausible values: addresses where the name says so, a word otherwise.
        let lookup = |name: &str| {
            vars.contains(name).then(|| {
                if name.ends_with("_IP") {
                    "192.0.2.10".to_string()
                } else {
                    "example-value".to_string()
                }
            })
        };
        let label = path.display().to_string();
        if let Err(e) = load_str_with_env(&text, &label, &lookup) {
            panic!("{label} does not validate:\n{e}");
        }
        checked.push(path.file_name().map(|n| n.to_string_lossy().into_owned()));
    }
    assert!(
        checked.contains(&Some("mediagate.yaml".to_string())),
        "{checked:?}"
    );
    assert!(checked.len() >= 2, "{checked:?}");
}

#[test]
fn local_example_needs_no_environment() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mediagate.yaml");
    let c = match load_file(&path) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert!(c.admin.listen.ip().is_loopback());
    assert!(c.listeners.iter().all(|l| l.listen.ip.is_loopback()));
}

#[test]
fn every_stage_reports_every_error_in_one_run() {
    let e = load(
        "admin: { token: '${NOPE}' }\nlisteners:\n  - { name: a, protocol: udp, listen: 'x:1', upstream: u }\n  - { name: b, protocol: udp, listen: 127.0.0.1:5004, upstream: u, colour: red }\n  - { name: c, protocol: udp, listen: 127.0.0.1:5006, upstream: gone }\nupstreams:\n  u:\n    primary: [127.0.0.1:6004, 10.0.0.300]\n    health: { interval: 10 mss, fall: 0 }\n",
    )
    .expect_err("broken in every stage");
    // A value that fails a stage counts as unset in the later ones; list indexes stay as
    // written although `listeners[0]` (no valid `listen`) is left out of later stages.
    assert_eq!(
        e.to_string(),
        [
            "t.yaml:1:17: admin.token: environment variable NOPE is not set",
            "t.yaml:3:39: listeners[0].listen: invalid listen address \"x:1\" (expected ip:port or ip:first-last)",
            "t.yaml:4:68: listeners[1].colour: unknown key \"colour\" (expected one of: name, protocol, listen, upstream, session, max_connections, offload, proxy_protocol, accept_proxy_protocol, trusted_proxies)",
            "t.yaml:5:65: listeners[2].upstream: unknown upstream \"gone\" (defined: u)",
            "t.yaml:8:31: upstreams.u.primary[1]: invalid server address \"10.0.0.300\"",
            "t.yaml:9:25: upstreams.u.health.interval: invalid duration \"10 mss\"",
            "t.yaml:9:39: upstreams.u.health.fall: must be at least 1",
        ]
        .join("\n")
    );
}

#[test]
fn cluster_and_events_sections() {
    let cfg = load_ok(&format!(
        "{MINIMAL}cluster:\n  listen: 127.0.0.1:7946\n  peers: [\"mediagate-peers:7946\", \"10.0.0.2:7946\"]\n  secret: 0123456789abcdef\nevents:\n  webhooks:\n    - {{ url: \"http://127.0.0.1:9000/hook\" }}\n"
    ));
    let c = cfg.cluster.expect("cluster");
    assert_eq!(c.peer_timeout.get(), std::time::Duration::from_secs(3));
    assert_eq!(
        c.gossip_interval.get(),
        std::time::Duration::from_millis(200)
    );
    assert_eq!(c.sync_timeout.get(), std::time::Duration::from_secs(2));
    assert_eq!(c.state_file, None);
    let h = &cfg.events.webhooks[0];
    assert_eq!(
        (h.retries, h.timeout.get()),
        (3, std::time::Duration::from_secs(2))
    );
    assert!(
        load_ok(MINIMAL).cluster.is_none(),
        "absent: a single process"
    );

    let err = load(&format!(
        "{MINIMAL}cluster:\n  listen: 0.0.0.0:7946\n  peers: [nohost]\n  secret: short\n  peer_timeout: 100ms\nevents:\n  webhooks:\n    - {{ url: \"ftp://x/\" }}\n    - {{ url: \"http://x/\", ca: ca.pem }}\n"
    ))
    .expect_err("invalid")
    .to_string();
    for part in [
        "cluster.secret: the secret must be at least 16 bytes",
        "cluster.peers[0]: \"nohost\" is not host:port",
        "cluster.peer_timeout: must be at least twice cluster.gossip_interval",
        "only http:// and https:// URLs are supported",
        "events.webhooks[1].ca: only for https:// URLs",
        "cluster.advertise: required when cluster.listen is a wildcard address",
    ] {
        assert!(err.contains(part), "missing {part:?} in:\n{err}");
    }
}

#[test]
fn offload_is_for_udp_listeners() {
    let c = load_ok(
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u, offload: ebpf }\nupstreams:\n  u:\n    primary: [127.0.0.1:6004]\n",
    );
    assert_eq!(c.listeners[0].offload, super::types::Offload::Ebpf);
    let e = load(
        "listeners:\n  - { name: a, protocol: tcp, listen: 127.0.0.1:5004, upstream: u, offload: ebpf }\nupstreams:\n  u:\n    primary: [127.0.0.1:6004]\n",
    )
    .expect_err("tcp offload");
    assert!(
        e.to_string()
            .contains("listeners[0].offload: offload: ebpf is only for UDP listeners"),
        "{e}"
    );
    let e = load(
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u, offload: xdp }\nupstreams:\n  u:\n    primary: [127.0.0.1:6004]\n",
    )
    .expect_err("unknown offload");
    assert!(e.to_string().contains("listeners[0].offload"), "{e}");
}

#[test]
fn choices_take_snake_and_kebab_case() {
    let base = "listeners:\n  - { name: a, protocol: udp, listen: 0.0.0.0:5000, upstream: u }\nupstreams:\n  u:\n    primary: [10.0.0.1, 10.0.0.2]\n";
    for (kebab, snake) in [
        ("failback: new-sessions", "failback: new_sessions"),
        ("balance: round-robin", "balance: round_robin"),
        ("balance: least-sessions", "balance: least_sessions"),
        ("when_all_down: keep-last", "when_all_down: keep_last"),
    ] {
        let a = load_ok(&format!("{base}    {kebab}\n"));
        let b = load_ok(&format!("{base}    {snake}\n"));
        assert_eq!(a, b, "{kebab} and {snake}");
    }
    assert_eq!(
        load_ok(base).upstreams["u"].failback.as_str(),
        "new_sessions"
    );
}

#[test]
fn turn_public_address_takes_one_entry_or_one_per_family() {
    let c = load_ok(
        "turn:\n  public_address: [203.0.113.7, '2001:db8::7']\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth: { type: ephemeral, secret: x }\n",
    );
    let p = c.turn.expect("turn section").public_address;
    assert_eq!(p.to_string(), "[203.0.113.7, 2001:db8::7]");
    assert_eq!(p.ips().count(), 2);
    let c = load_ok(
        "turn:\n  public_address: turn.example.org\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth: { type: ephemeral, secret: x }\n",
    );
    let p = c.turn.expect("turn section").public_address;
    assert_eq!(
        (p.to_string().as_str(), p.ips().count()),
        ("turn.example.org", 0)
    );
}

#[test]
fn turn_relay_default_family_parses() {
    let c = load_ok(
        "turn:\n  public_address: 1.2.3.4\n  listeners: [{ protocol: udp, listen: '[::]:3478' }]\n  auth: { type: ephemeral, secret: x }\n  relay: { address: ['0.0.0.0', '::'], default_family: keep }\n",
    );
    let f = c.turn.expect("turn section").relay.default_family;
    assert_eq!(f, crate::config::DefaultFamily::Keep);
    assert!(f.ipv4_for("[::ffff:10.0.0.1]:5000".parse().unwrap()));
    assert!(f.ipv4_for("10.0.0.1:5000".parse().unwrap()));
    assert!(!f.ipv4_for("[2001:db8::1]:5000".parse().unwrap()));
    assert!(load("turn:\n  public_address: 1.2.3.4\n  listeners: [{ protocol: udp, listen: '0.0.0.0:3478' }]\n  auth: { type: ephemeral, secret: x }\n  relay: { default_family: both }\n").is_err());
}

#[test]
fn turn_relay_address_takes_one_address_per_family() {
    let c = load_ok(
        "turn:\n  public_address: 1.2.3.4\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth: { type: ephemeral, secret: x }\n  relay: { address: [10.0.0.1, 'fd00::1'] }\n",
    );
    let a = c.turn.expect("turn section").relay.address;
    assert_eq!(a.family(true), Some("10.0.0.1".parse().unwrap()));
    assert_eq!(a.family(false), Some("fd00::1".parse().unwrap()));
    assert_eq!(a.to_string(), "[10.0.0.1, fd00::1]");
    let c = load_ok(
        "turn:\n  public_address: 1.2.3.4\n  listeners: [{ protocol: udp, listen: 0.0.0.0:3478 }]\n  auth: { type: ephemeral, secret: x }\n  relay: { address: '::' }\n",
    );
    let a = c.turn.expect("turn section").relay.address;
    assert_eq!((a.family(true), a.to_string().as_str()), (None, "::"));
    for (list, why) in [
        (
            "[10.0.0.1, 10.0.0.2]",
            "two IPv4 addresses (at most one per family)",
        ),
        (
            "[]",
            "expected an IP address or a list of one IPv4 and one IPv6 address",
        ),
        ("[10.0.0.1, nope]", "invalid IP address \"nope\""),
    ] {
        let text = format!(
            "turn:\n  public_address: 1.2.3.4\n  listeners: []\n  auth: {{type: ephemeral, secret: x}}\n  relay: {{ address: {list} }}\n"
        );
        let errs: Vec<String> = match load(&text) {
            Ok(_) => panic!("{list} must be refused"),
            Err(e) => e.to_string().lines().map(str::to_string).collect(),
        };
        assert!(
            errs.iter().any(|e| e.starts_with("t.yaml:5:")
                && e.contains("turn.relay.address")
                && e.contains(why)),
            "{list}: {errs:?}"
        );
    }
}
