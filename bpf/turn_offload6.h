// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// mediagate kernel fast path, TURN over IPv6 (included by udp_offload.c after its IPv6
// helpers; the design is in src/offload/turn.rs). The IPv4 part (turn_offload.h) with
// 128-bit addresses: an allocation whose client, listener, relayed address and peer are
// all IPv6 gets one pair of entries per channel,
//
//   mg_turn_chan6: (client ip:port -> listener ip:port, channel)
//                  => (relay ip:port -> peer ip:port)
//   mg_turn_peer6: (peer ip:port -> relay ip:port)
//                  => (listener ip:port -> client ip:port, channel)
//
// Mixed families (an IPv4 client relayed to an IPv6 peer, or the reverse) stay in user
// space: the datagram would change its IP header, not only its addresses.
//
// IPv6 has no header checksum; the UDP checksum covers the 128-bit addresses and the
// upper-layer length through the pseudo header and is fixed incrementally, one 32-bit
// word at a time, as in the IPv4 part. The payload moves at the tail end, never the
// headers, so datagrams sent by local sockets with checksum offload are relayed too.

struct turn_chan_key6 {
	struct flow_key6 flow;
	// The channel number, network order.
	__u16 channel;
	__u16 _pad;
};

// What a matching datagram becomes (the fields mean what they mean in struct flow_nat).
struct turn_nat6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u32 slot;
	__u32 ifindex;
	__u32 taught;
	__u32 channel;
	__u8 taught_addr[16];
	__u32 _pad;
	__u64 packets;
	__u64 bytes;
	__u64 last_ns;
	__u64 expires_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct turn_chan_key6);
	__type(value, struct turn_nat6);
} mg_turn_chan6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key6);
	__type(value, struct turn_nat6);
} mg_turn_peer6 SEC(".maps");

#define IP6_PLEN_OFF (ETH_HLEN + offsetof(struct ipv6hdr, payload_len))
#define UDP6_LEN_OFF (UDP6_OFF + offsetof(struct udphdr, len))
#define TURN6_HDR_OFF (UDP6_OFF + sizeof(struct udphdr))

// The header fields a relayed IPv6 datagram had when it arrived.
struct turn_old6 {
	struct flow_key6 addrs;
	__u16 plen;
	__u16 check;
};

// After the payload moved: new lengths (payload length and UDP length, both the UDP
// length), addresses and ports, with the UDP checksum. See turn_rewrite.
static __always_inline int turn_rewrite6(struct __sk_buff *skb, const struct turn_old6 *old,
					 const struct flow_key6 *to, __u32 hdr, int grow)
{
	__u16 ul = bpf_ntohs(old->plen);
	__u16 new_len = bpf_htons(grow ? ul + 4 : ul - 4);
	if (bpf_skb_store_bytes(skb, IP6_PLEN_OFF, &new_len, sizeof(new_len), 0))
		return -1;
	// The UDP length counts twice: in the pseudo header and in the UDP header.
	if (bpf_l4_csum_replace(skb, UDP6_CSUM_OFF, old->plen, new_len,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(new_len)) ||
	    bpf_l4_csum_replace(skb, UDP6_CSUM_OFF, old->plen, new_len,
				BPF_F_MARK_MANGLED_0 | sizeof(new_len)) ||
	    bpf_skb_store_bytes(skb, UDP6_LEN_OFF, &new_len, sizeof(new_len), 0))
		return -1;
	if (bpf_l4_csum_replace(skb, UDP6_CSUM_OFF, grow ? 0 : hdr, grow ? hdr : 0,
				BPF_F_MARK_MANGLED_0 | sizeof(hdr)))
		return -1;
	if (rewrite6(skb, IP6_SRC_OFF, old->addrs.saddr, to->saddr) ||
	    rewrite6(skb, IP6_DST_OFF, old->addrs.daddr, to->daddr) ||
	    rewrite_port6(skb, UDP6_SRC_OFF, old->addrs.sport, to->sport) ||
	    rewrite_port6(skb, UDP6_DST_OFF, old->addrs.dport, to->dport))
		return -1;
	if (old->check != 0)
		bpf_csum_update(skb, grow ? bpf_csum_diff(&hdr, sizeof(hdr), NULL, 0, 0)
					  : bpf_csum_diff(NULL, 0, &hdr, sizeof(hdr), 0));
	return 0;
}

// IPv6/UDP without extension headers, of exactly the length the headers say; fills
// `old`. Returns the UDP payload length, or 0 when the datagram stays with user space.
static __always_inline __u32 turn_parse6(struct __sk_buff *skb, struct turn_old6 *old)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + IP_OFF;
	struct udphdr *udp = data + UDP6_OFF;
	if ((void *)(udp + 1) > end)
		return 0;
	__u32 plen = bpf_ntohs(ip6->payload_len), ulen = bpf_ntohs(udp->len);
	if (skb->len != UDP6_OFF + plen || plen != ulen || ulen <= sizeof(struct udphdr) ||
	    skb->gso_size != 0 || skb->gso_segs > 1)
		return 0;
	__builtin_memcpy(old->addrs.saddr, &ip6->saddr, 16);
	__builtin_memcpy(old->addrs.daddr, &ip6->daddr, 16);
	old->addrs.sport = udp->source;
	old->addrs.dport = udp->dest;
	old->plen = ip6->payload_len;
	old->check = udp->check;
	return ulen - sizeof(struct udphdr);
}

static __always_inline void turn_count6(struct turn_nat6 *nat, __u32 bytes, __u64 now)
{
	__sync_fetch_and_add(&nat->packets, 1);
	__sync_fetch_and_add(&nat->bytes, bytes);
	nat->last_ns = now;
	__u32 slot = nat->slot;
	struct totals *t = bpf_map_lookup_elem(&mg_totals, &slot);
	if (t) {
		t->packets += 1;
		t->bytes += bytes;
	}
}

// Looks `key` up in `map`, then with its destination address (`daddr`, a field of `key`)
// zeroed: the entry of a socket bound to `::`. `*wildcard` tells which one matched.
static __always_inline struct turn_nat6 *turn_lookup6(void *map, void *key, __u8 *daddr,
						      int *wildcard)
{
	struct turn_nat6 *v = bpf_map_lookup_elem(map, key);
	if (v)
		return v;
	__builtin_memset(daddr, 0, 16);
	v = bpf_map_lookup_elem(map, key);
	if (v && wildcard)
		*wildcard = 1;
	return v;
}

static __always_inline int must_teach6(const struct turn_nat6 *nat, __u32 in_if, int wildcard,
				       const __u8 *daddr)
{
	return nat->taught != in_if || (wildcard && !eq16(nat->taught_addr, daddr));
}

static __always_inline void teach6(struct turn_nat6 *nat, struct turn_nat6 *pair, __u32 in_if,
				   int wildcard, const __u8 *daddr)
{
	if (!pair)
		return;
	pair->ifindex = in_if;
	if (wildcard)
		__builtin_memcpy(pair->saddr, daddr, 16);
	nat->taught = in_if;
	__builtin_memcpy(nat->taught_addr, daddr, 16);
}

// The addresses `nat` gives its datagrams, or (`reversed`) those its pair's datagrams
// arrive with.
static __always_inline void nat_addrs6(const struct turn_nat6 *nat, struct flow_key6 *k,
				       int reversed)
{
	__builtin_memcpy(k->saddr, reversed ? nat->daddr : nat->saddr, 16);
	__builtin_memcpy(k->daddr, reversed ? nat->saddr : nat->daddr, 16);
	k->sport = reversed ? nat->dport : nat->sport;
	k->dport = reversed ? nat->sport : nat->dport;
}

// ChannelData from a client on an installed IPv6 channel: to the peer.
static __always_inline int turn_to_peer6(struct __sk_buff *skb, const struct turn_old6 *old,
					 __u32 payload)
{
	if (payload < 5)
		return TC_ACT_UNSPEC;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u8 *h = data + TURN6_HDR_OFF;
	if ((void *)(h + 4) > end)
		return TC_ACT_UNSPEC;
	if (h[0] < 0x40 || h[0] > 0x7f)
		return TC_ACT_UNSPEC;
	__u32 clen = ((__u32)h[2] << 8) | h[3];
	if (payload != 4 + clen || clen < 1 || clen > TURN_MAX_DATA)
		return TC_ACT_UNSPEC;
	__u32 hdr;
	__builtin_memcpy(&hdr, h, sizeof(hdr));
	struct turn_chan_key6 key = {
		.flow = old->addrs,
		.channel = (__u16)(h[0] | (h[1] << 8)),
	};
	int wildcard = 0; // a listener on ::
	struct turn_nat6 *nat = turn_lookup6(&mg_turn_chan6, &key, key.flow.daddr, &wildcard);
	if (!nat)
		return TC_ACT_UNSPEC;
	__u64 now = bpf_ktime_get_ns();
	if (nat->expires_ns && now >= nat->expires_ns)
		return TC_ACT_UNSPEC;
	__u32 in_if = skb->ingress_ifindex;
	if (must_teach6(nat, in_if, wildcard, old->addrs.daddr)) {
		struct flow_key6 pk = {};
		nat_addrs6(nat, &pk, 1);
		struct turn_nat6 *peer = turn_lookup6(&mg_turn_peer6, &pk, pk.daddr, NULL);
		teach6(nat, peer, in_if, wildcard, old->addrs.daddr);
	}
	__u32 out_if = nat->ifindex;
	if (zero16(nat->saddr) || out_if == 0)
		return TC_ACT_UNSPEC;
	__u32 mtu_len = 0;
	if (bpf_check_mtu(skb, out_if, &mtu_len, -4, 0))
		return TC_ACT_UNSPEC;
	// Only what the rewrite needs (the stack of the whole program is 512 bytes).
	struct flow_key6 to;
	nat_addrs6(nat, &to, 0);
	__u32 zero = 0;
	struct turn_scratch *sc = bpf_map_lookup_elem(&mg_turn_scratch, &zero);
	if (!sc)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, TURN6_HDR_OFF + 4, sc->buf, clen))
		return TC_ACT_UNSPEC;
	turn_count6(nat, clen, now);
	if (bpf_skb_store_bytes(skb, TURN6_HDR_OFF, sc->buf, clen, BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_change_tail(skb, skb->len - 4, 0) || turn_rewrite6(skb, old, &to, hdr, 0))
		return TC_ACT_SHOT;
	return deliver(in_if, out_if);
}

// A datagram from a peer with an installed IPv6 channel: to the client, as ChannelData.
static __always_inline int turn_to_client6(struct __sk_buff *skb, const struct turn_old6 *old,
					   __u32 n)
{
	if (n < 1 || n > TURN_MAX_DATA)
		return TC_ACT_UNSPEC;
	struct flow_key6 key = old->addrs;
	int wildcard = 0; // a relay socket on ::
	struct turn_nat6 *nat = turn_lookup6(&mg_turn_peer6, &key, key.daddr, &wildcard);
	if (!nat)
		return TC_ACT_UNSPEC;
	__u64 now = bpf_ktime_get_ns();
	if (nat->expires_ns && now >= nat->expires_ns)
		return TC_ACT_UNSPEC;
	__u32 in_if = skb->ingress_ifindex;
	if (must_teach6(nat, in_if, wildcard, old->addrs.daddr)) {
		struct turn_chan_key6 ck = {.channel = (__u16)nat->channel};
		nat_addrs6(nat, &ck.flow, 1);
		struct turn_nat6 *chan = turn_lookup6(&mg_turn_chan6, &ck, ck.flow.daddr, NULL);
		teach6(nat, chan, in_if, wildcard, old->addrs.daddr);
	}
	__u32 out_if = nat->ifindex;
	if (zero16(nat->saddr) || out_if == 0)
		return TC_ACT_UNSPEC;
	__u32 mtu_len = 0;
	if (bpf_check_mtu(skb, out_if, &mtu_len, 4, 0))
		return TC_ACT_UNSPEC;
	// Only what the rewrite needs (the stack of the whole program is 512 bytes).
	struct flow_key6 to;
	nat_addrs6(nat, &to, 0);
	__u16 len_be = bpf_htons((__u16)n);
	__u32 hdr = (__u32)(__u16)nat->channel | ((__u32)len_be << 16);
	__u32 zero = 0;
	struct turn_scratch *sc = bpf_map_lookup_elem(&mg_turn_scratch, &zero);
	if (!sc)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, TURN6_HDR_OFF, sc->buf, n))
		return TC_ACT_UNSPEC;
	turn_count6(nat, n, now);
	if (bpf_skb_change_tail(skb, skb->len + 4, 0) ||
	    bpf_skb_store_bytes(skb, TURN6_HDR_OFF + 4, sc->buf, n, BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_store_bytes(skb, TURN6_HDR_OFF, &hdr, sizeof(hdr), BPF_F_RECOMPUTE_CSUM) ||
	    turn_rewrite6(skb, old, &to, hdr, 1))
		return TC_ACT_SHOT;
	return deliver(in_if, out_if);
}

// An IPv6 datagram no UDP session claimed: TURN data, or none of ours.
static __always_inline int turn_ingress6(struct __sk_buff *skb)
{
	struct turn_old6 old = {};
	__u32 payload = turn_parse6(skb, &old);
	if (payload == 0)
		return TC_ACT_UNSPEC;
	int r = turn_to_peer6(skb, &old, payload);
	if (r != TC_ACT_UNSPEC)
		return r;
	return turn_to_client6(skb, &old, payload);
}
