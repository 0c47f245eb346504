// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// mediagate kernel fast path: forwards datagrams of established UDP sessions that user
// space installed in `mg_flows`, and relays the data of TURN channels that user space
// installed in `mg_turn_chan`/`mg_turn_peer`, at the TC ingress hook (see
// src/offload/mod.rs and src/offload/turn.rs for the design). UDP sessions over IPv4
// (`mg_flows`) and IPv6 (`mg_flows6`); TURN channels over IPv4 (turn_offload.h) and IPv6
// (turn_offload6.h). A datagram that
// matches no entry is left alone with TC_ACT_UNSPEC
// ("next"), so other TCX programs on the same device (another mediagate, Cilium) still
// see it.
//
// Built by build.rs with: clang -O2 -g -target bpf -c udp_offload.c
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

// A datagram's addresses as seen on the wire (network byte order).
struct flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

// What a matching datagram becomes, and the entry's counters (updated here, read by
// user space for the idle sweep).
struct flow_nat {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	// (listener index << 1) | direction (0: to the server, 1: to the client).
	__u32 slot;
	// Where the rewritten datagram leaves: the device the other direction's datagrams
	// arrive on (taught by them; 0 until then, and user space forwards meanwhile).
	__u32 ifindex;
	// The ingress device this entry last taught its paired entry.
	__u32 taught;
	// The listener address this entry last taught (wildcard listeners).
	__u32 taught_addr;
	// TURN: the channel number (network order) written in front of a peer's datagram.
	__u32 channel;
	__u64 packets;
	__u64 bytes;
	__u64 last_ns;
	// TURN: bpf_ktime_get_ns() after which the entry no longer relays (the channel's or
	// the permission's end, whichever comes first); user space moves it on refreshes.
	// 0: no end (UDP sessions).
	__u64 expires_ns;
};

struct totals {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct flow_key);
	__type(value, struct flow_nat);
} mg_flows SEC(".maps");

// Per listener and direction: slot = (listener << 1) | direction.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct totals);
} mg_totals SEC(".maps");

// IPv6: a datagram's addresses as on the wire.
struct flow_key6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
};

// IPv6: what a matching datagram becomes, and the entry's counters (the fields mean
// what they mean in struct flow_nat; no TURN).
struct flow_nat6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u32 slot;
	__u32 ifindex;
	__u32 taught;
	// The listener address this entry last taught (wildcard listeners).
	__u8 taught_addr[16];
	__u64 packets;
	__u64 bytes;
	__u64 last_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct flow_key6);
	__type(value, struct flow_nat6);
} mg_flows6 SEC(".maps");

#define LOOPBACK_IFINDEX 1
#define IP_OFF ETH_HLEN
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define UDP_OFF (ETH_HLEN + sizeof(struct iphdr))
#define UDP_CSUM_OFF (UDP_OFF + offsetof(struct udphdr, check))
#define UDP_SRC_OFF (UDP_OFF + offsetof(struct udphdr, source))
#define UDP_DST_OFF (UDP_OFF + offsetof(struct udphdr, dest))

static __always_inline int rewrite4(struct __sk_buff *skb, __u32 ip_off, __u32 old, __u32 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old, new,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(new)))
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, ip_off, &new, sizeof(new), 0);
}

static __always_inline int rewrite_port(struct __sk_buff *skb, __u32 off, __u16 old, __u16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old, new, BPF_F_MARK_MANGLED_0 | sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

// Sends a rewritten datagram on: out of `out_if`, or into lo for a local peer.
static __always_inline int deliver(__u32 in_if, __u32 out_if)
{
	if (out_if == LOOPBACK_IFINDEX) {
		// Local peer: lo's ingress delivers the rewritten datagram (no entry matches it).
		if (in_if == LOOPBACK_IFINDEX)
			return TC_ACT_OK;
		// From another device (a loopback address must not arrive there): out of lo
		// with a route attached, as a local send would be; without one, lo's input
		// routing would drop a 127/8 destination as a martian.
		return bpf_redirect_neigh(LOOPBACK_IFINDEX, NULL, 0, 0);
	}
	// Out of a real device (the same one for a hairpin, as in a pod): the kernel routes
	// it from that device and resolves the next hop's address.
	return bpf_redirect_neigh(out_if, NULL, 0, 0);
}

// Whether `nat`, matched by a datagram that arrived on `in_if` sent to `daddr` (by its
// wildcard key when `wildcard`), has something to teach its pair.
static __always_inline int must_teach(const struct flow_nat *nat, __u32 in_if, int wildcard,
				      __u32 daddr)
{
	return nat->taught != in_if || (wildcard && nat->taught_addr != daddr);
}

// The pair of `nat` (the other direction's entry, if found) learns that its datagrams
// leave from `in_if`, and for a wildcard match the address to send them from, `daddr`.
static __always_inline void teach(struct flow_nat *nat, struct flow_nat *pair, __u32 in_if,
				  int wildcard, __u32 daddr)
{
	if (!pair)
		return;
	pair->ifindex = in_if;
	if (wildcard)
		pair->saddr = daddr;
	nat->taught = in_if;
	nat->taught_addr = daddr;
}

#include "turn_offload.h"

#define IP6_SRC_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP6_DST_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))
#define UDP6_OFF (ETH_HLEN + sizeof(struct ipv6hdr))
#define UDP6_CSUM_OFF (UDP6_OFF + offsetof(struct udphdr, check))
#define UDP6_SRC_OFF (UDP6_OFF + offsetof(struct udphdr, source))
#define UDP6_DST_OFF (UDP6_OFF + offsetof(struct udphdr, dest))

// Replaces the 16-byte address at `off` (IPv6 has no header checksum; the UDP checksum
// covers the address through the pseudo header, fixed one 32-bit word at a time).
static __always_inline int rewrite6(struct __sk_buff *skb, __u32 off, const __u8 *old,
				    const __u8 *new)
{
	int changed = 0;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u32 o, n;
		__builtin_memcpy(&o, old + 4 * i, 4);
		__builtin_memcpy(&n, new + 4 * i, 4);
		if (o == n)
			continue;
		changed = 1;
		if (bpf_l4_csum_replace(skb, UDP6_CSUM_OFF, o, n,
					BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4))
			return -1;
	}
	if (!changed)
		return 0;
	return bpf_skb_store_bytes(skb, off, new, 16, 0);
}

static __always_inline int eq16(const __u8 *a, const __u8 *b)
{
	__u64 a0, a1, b0, b1;
	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	__builtin_memcpy(&b0, b, 8);
	__builtin_memcpy(&b1, b + 8, 8);
	return a0 == b0 && a1 == b1;
}

static __always_inline int zero16(const __u8 *a)
{
	__u64 a0, a1;
	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	return (a0 | a1) == 0;
}

static __always_inline int rewrite_port6(struct __sk_buff *skb, __u32 off, __u16 old, __u16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, UDP6_CSUM_OFF, old, new, BPF_F_MARK_MANGLED_0 | sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

#include "turn_offload6.h"

// IPv6/UDP without extension headers (anything else goes to the stack): the IPv4 path
// of mg_ingress over `mg_flows6`.
static __always_inline int ingress6(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + IP_OFF;
	struct udphdr *udp = data + UDP6_OFF;

	if ((void *)(udp + 1) > end)
		return TC_ACT_UNSPEC;
	if (ip6->version != 6 || ip6->nexthdr != IPPROTO_UDP)
		return TC_ACT_UNSPEC;

	struct flow_key6 key = {};
	__builtin_memcpy(key.saddr, &ip6->saddr, 16);
	__builtin_memcpy(key.daddr, &ip6->daddr, 16);
	key.sport = udp->source;
	key.dport = udp->dest;
	__u32 payload = bpf_ntohs(udp->len);
	payload = payload >= sizeof(struct udphdr) ? payload - sizeof(struct udphdr) : 0;

	int wildcard = 0;
	struct flow_nat6 *nat = bpf_map_lookup_elem(&mg_flows6, &key);
	if (!nat) {
		// A listener on :: installs its client entries with daddr ::.
		__builtin_memset(key.daddr, 0, 16);
		nat = bpf_map_lookup_elem(&mg_flows6, &key);
		if (!nat)
			return turn_ingress6(skb);
		wildcard = 1;
		__builtin_memcpy(key.daddr, &ip6->daddr, 16);
	}
	// The reply entry of a wildcard listener before the kernel saw which address the
	// client used: user space answers this one.
	if (zero16(nat->saddr))
		return TC_ACT_UNSPEC;
	__u32 in_if = skb->ingress_ifindex;
	if (nat->taught != in_if || (wildcard && !eq16(nat->taught_addr, key.daddr))) {
		struct flow_key6 pk = {};
		__builtin_memcpy(pk.saddr, nat->daddr, 16);
		__builtin_memcpy(pk.daddr, nat->saddr, 16);
		pk.sport = nat->dport;
		pk.dport = nat->sport;
		struct flow_nat6 *peer = bpf_map_lookup_elem(&mg_flows6, &pk);
		if (!peer) {
			__builtin_memset(pk.daddr, 0, 16); // the client entry of a wildcard listener
			peer = bpf_map_lookup_elem(&mg_flows6, &pk);
		}
		if (peer) {
			if (wildcard)
				__builtin_memcpy(peer->saddr, key.daddr, 16);
			peer->ifindex = in_if;
			nat->taught = in_if;
			__builtin_memcpy(nat->taught_addr, key.daddr, 16);
		}
	}
	__u32 out_if = nat->ifindex;
	if (out_if == 0)
		return TC_ACT_UNSPEC;
	__u32 mtu_len = 0;
	if (bpf_check_mtu(skb, out_if, &mtu_len, 0, 0))
		return TC_ACT_UNSPEC;

	struct flow_nat6 to = *nat;
	__sync_fetch_and_add(&nat->packets, 1);
	__sync_fetch_and_add(&nat->bytes, payload);
	nat->last_ns = bpf_ktime_get_ns();

	// Packet pointers are invalid after the first helper that changes the packet.
	if (rewrite6(skb, IP6_SRC_OFF, key.saddr, to.saddr) ||
	    rewrite6(skb, IP6_DST_OFF, key.daddr, to.daddr) ||
	    rewrite_port6(skb, UDP6_SRC_OFF, key.sport, to.sport) ||
	    rewrite_port6(skb, UDP6_DST_OFF, key.dport, to.dport))
		return TC_ACT_SHOT;

	__u32 slot = to.slot;
	struct totals *t = bpf_map_lookup_elem(&mg_totals, &slot);
	if (t) {
		t->packets += 1;
		t->bytes += payload;
	}
	return deliver(in_if, out_if);
}

SEC("classifier")
int mg_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + IP_OFF;
	struct udphdr *udp = data + UDP_OFF;

	if ((void *)(eth + 1) > end)
		return TC_ACT_UNSPEC;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return ingress6(skb);
	if ((void *)(udp + 1) > end)
		return TC_ACT_UNSPEC;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4 || ip->ihl != 5 ||
	    ip->protocol != IPPROTO_UDP)
		return TC_ACT_UNSPEC;
	// Fragments (MF set or an offset) stay with the stack.
	if (ip->frag_off & bpf_htons(0x3fff))
		return TC_ACT_UNSPEC;

	struct flow_key key = {
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.sport = udp->source,
		.dport = udp->dest,
	};
	__u32 orig_daddr = key.daddr;
	int wildcard = 0;
	struct flow_nat *nat = bpf_map_lookup_elem(&mg_flows, &key);
	if (!nat) {
		// A listener on 0.0.0.0 installs its client entries with daddr 0.
		key.daddr = 0;
		nat = bpf_map_lookup_elem(&mg_flows, &key);
		if (!nat)
			return turn_ingress(skb);
		wildcard = 1;
	}
	// The reply entry of a wildcard listener before the kernel saw which address the
	// client used: user space answers this one.
	if (nat->saddr == 0)
		return TC_ACT_UNSPEC;
	// The paired entry (the other direction of the session) learns the device this
	// direction arrives on, which is where its own datagrams must leave; a wildcard
	// listener's reply entry also learns the address the client sent to.
	__u32 in_if = skb->ingress_ifindex;
	if (must_teach(nat, in_if, wildcard, orig_daddr)) {
		struct flow_key pk = {
			.saddr = nat->daddr,
			.daddr = nat->saddr,
			.sport = nat->dport,
			.dport = nat->sport,
		};
		struct flow_nat *peer = bpf_map_lookup_elem(&mg_flows, &pk);
		if (!peer) {
			pk.daddr = 0; // the client entry of a wildcard listener
			peer = bpf_map_lookup_elem(&mg_flows, &pk);
		}
		teach(nat, peer, in_if, wildcard, orig_daddr);
	}
	if (wildcard)
		key.daddr = orig_daddr;
	__u32 out_if = nat->ifindex;
	if (out_if == 0)
		return TC_ACT_UNSPEC;
	// Too big for the egress device: user space sends it (the stack fragments it).
	__u32 mtu_len = 0;
	if (bpf_check_mtu(skb, out_if, &mtu_len, 0, 0))
		return TC_ACT_UNSPEC;

	__u32 payload = bpf_ntohs(udp->len);
	payload = payload >= sizeof(struct udphdr) ? payload - sizeof(struct udphdr) : 0;
	__u32 new_saddr = nat->saddr, new_daddr = nat->daddr;
	__u16 new_sport = nat->sport, new_dport = nat->dport;
	__u32 slot = nat->slot;
	__sync_fetch_and_add(&nat->packets, 1);
	__sync_fetch_and_add(&nat->bytes, payload);
	nat->last_ns = bpf_ktime_get_ns();

	// Packet pointers are invalid after the first helper that changes the packet.
	if (rewrite4(skb, IP_SRC_OFF, key.saddr, new_saddr) ||
	    rewrite4(skb, IP_DST_OFF, key.daddr, new_daddr) ||
	    rewrite_port(skb, UDP_SRC_OFF, key.sport, new_sport) ||
	    rewrite_port(skb, UDP_DST_OFF, key.dport, new_dport))
		return TC_ACT_SHOT;

	struct totals *t = bpf_map_lookup_elem(&mg_totals, &slot);
	if (t) {
		t->packets += 1;
		t->bytes += payload;
	}

	return deliver(in_if, out_if);
}

char _license[] SEC("license") = "Dual MIT/GPL";
