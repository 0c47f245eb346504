// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// mediagate kernel fast path, TURN part (included by udp_offload.c; the design is in
// src/offload/turn.rs). User space installs one pair of entries per channel binding of a
// UDP allocation whose permission is live:
//
//   mg_turn_chan: (client ip:port -> listener ip:port, channel)
//                 => (relay ip:port -> peer ip:port)
//       ChannelData from the client loses its 4-byte header and leaves as a plain
//       datagram from the relay address to the peer.
//   mg_turn_peer: (peer ip:port -> relay ip:port)
//                 => (listener ip:port -> client ip:port, channel)
//       a datagram from the peer gets a ChannelData header and leaves for the client.
//
// Everything else (STUN, Send and Data indications, unbound channels, padded ChannelData,
// entries past their `expires_ns`) returns TC_ACT_UNSPEC and reaches user space, which
// answers as without the fast path.
//
// The payload moves by 4 bytes at the tail end (bpf_skb_change_tail plus a copy through a
// per-CPU buffer), never the headers: a datagram a local socket sent with checksum offload
// (CHECKSUM_PARTIAL, completed later from skb->csum_start) keeps its UDP header where
// csum_start points, so such datagrams are relayed too.

struct turn_chan_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	// The channel number, network order.
	__u16 channel;
	__u16 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct turn_chan_key);
	__type(value, struct flow_nat);
} mg_turn_chan SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow_nat);
} mg_turn_peer SEC(".maps");

// Largest payload moved (the copy goes through this per-CPU buffer).
#define TURN_MAX_DATA 2040

struct turn_scratch {
	__u8 buf[2048];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct turn_scratch);
} mg_turn_scratch SEC(".maps");

#define IP_LEN_OFF (ETH_HLEN + offsetof(struct iphdr, tot_len))
#define UDP_LEN_OFF (UDP_OFF + offsetof(struct udphdr, len))
#define TURN_HDR_OFF (UDP_OFF + sizeof(struct udphdr))

// The header fields a relayed datagram had when it arrived.
struct turn_old {
	struct flow_key addrs;
	__u16 tot_len;
	__u16 ulen;
	__u16 check;
};

// After the payload moved (user data shifted, length changed by `grow` ? +4 : -4 bytes):
// new lengths, addresses and ports, with the IP and UDP checksums. `hdr` is the
// ChannelData header word removed or added. A zero UDP checksum (none) stays zero. For
// CHECKSUM_PARTIAL only the pseudo-header changes apply (the helpers skip the others: the
// checksum is completed over the final bytes later).
static __always_inline int turn_rewrite(struct __sk_buff *skb, const struct turn_old *old,
					const struct flow_nat *to, __u32 hdr, int grow)
{
	__u16 tot = bpf_ntohs(old->tot_len), ul = bpf_ntohs(old->ulen);
	__u16 new_tot = bpf_htons(grow ? tot + 4 : tot - 4);
	__u16 new_ulen = bpf_htons(grow ? ul + 4 : ul - 4);
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old->tot_len, new_tot, sizeof(new_tot)) ||
	    bpf_skb_store_bytes(skb, IP_LEN_OFF, &new_tot, sizeof(new_tot), 0))
		return -1;
	// The UDP length counts twice: in the pseudo header and in the UDP header.
	if (bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old->ulen, new_ulen,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(new_ulen)) ||
	    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old->ulen, new_ulen,
				BPF_F_MARK_MANGLED_0 | sizeof(new_ulen)) ||
	    bpf_skb_store_bytes(skb, UDP_LEN_OFF, &new_ulen, sizeof(new_ulen), 0))
		return -1;
	if (bpf_l4_csum_replace(skb, UDP_CSUM_OFF, grow ? 0 : hdr, grow ? hdr : 0,
				BPF_F_MARK_MANGLED_0 | sizeof(hdr)))
		return -1;
	if (rewrite4(skb, IP_SRC_OFF, old->addrs.saddr, to->saddr) ||
	    rewrite4(skb, IP_DST_OFF, old->addrs.daddr, to->daddr) ||
	    rewrite_port(skb, UDP_SRC_OFF, old->addrs.sport, to->sport) ||
	    rewrite_port(skb, UDP_DST_OFF, old->addrs.dport, to->dport))
		return -1;
	// skb->csum (CHECKSUM_COMPLETE) followed the moved bytes, but not the checksum
	// field's change for the header word: add it.
	if (old->check != 0)
		bpf_csum_update(skb, grow ? bpf_csum_diff(&hdr, sizeof(hdr), NULL, 0, 0)
					  : bpf_csum_diff(NULL, 0, &hdr, sizeof(hdr), 0));
	return 0;
}

// Checks shared by both directions; fills `old`. Returns the UDP payload length, or 0
// when the datagram stays with user space.
static __always_inline __u32 turn_parse(struct __sk_buff *skb, struct turn_old *old)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	struct udphdr *udp = data + UDP_OFF;
	if ((void *)(udp + 1) > end)
		return 0;
	__u32 tot = bpf_ntohs(ip->tot_len), ulen = bpf_ntohs(udp->len);
	// Link-layer padding, GRO batches and odd lengths stay with the stack.
	if (skb->len != ETH_HLEN + tot || tot != sizeof(struct iphdr) + ulen ||
	    ulen <= sizeof(struct udphdr) || skb->gso_size != 0 || skb->gso_segs > 1)
		return 0;
	old->addrs.saddr = ip->saddr;
	old->addrs.daddr = ip->daddr;
	old->addrs.sport = udp->source;
	old->addrs.dport = udp->dest;
	old->tot_len = ip->tot_len;
	old->ulen = udp->len;
	old->check = udp->check;
	return ulen - sizeof(struct udphdr);
}

static __always_inline void turn_count(struct flow_nat *nat, __u32 bytes, __u64 now)
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

// ChannelData from a client on an installed channel: to the peer.
// Looks `key` up in `map`, then, if absent, with its destination address (`*daddr`, a
// field of `key`) zeroed: the entry of a socket bound to 0.0.0.0. `*wildcard` tells which
// one matched (may be NULL).
static __always_inline struct flow_nat *turn_lookup(void *map, void *key, __u32 *daddr,
						    int *wildcard)
{
	struct flow_nat *v = bpf_map_lookup_elem(map, key);
	if (v)
		return v;
	*daddr = 0;
	v = bpf_map_lookup_elem(map, key);
	if (v && wildcard)
		*wildcard = 1;
	return v;
}

static __always_inline int turn_to_peer(struct __sk_buff *skb, const struct turn_old *old,
					__u32 payload)
{
	if (payload < 5)
		return TC_ACT_UNSPEC;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u8 *h = data + TURN_HDR_OFF;
	if ((void *)(h + 4) > end)
		return TC_ACT_UNSPEC;
	if (h[0] < 0x40 || h[0] > 0x7f)
		return TC_ACT_UNSPEC;
	__u32 clen = ((__u32)h[2] << 8) | h[3];
	// Unpadded ChannelData only (padding is optional over UDP, RFC 8656 §12.5).
	if (payload != 4 + clen || clen < 1 || clen > TURN_MAX_DATA)
		return TC_ACT_UNSPEC;
	__u32 hdr;
	__builtin_memcpy(&hdr, h, sizeof(hdr));
	struct turn_chan_key key = {
		.saddr = old->addrs.saddr,
		.daddr = old->addrs.daddr,
		.sport = old->addrs.sport,
		.dport = old->addrs.dport,
		.channel = (__u16)(h[0] | (h[1] << 8)),
	};
	int wildcard = 0; // a listener on 0.0.0.0
	struct flow_nat *nat = turn_lookup(&mg_turn_chan, &key, &key.daddr, &wildcard);
	if (!nat)
		return TC_ACT_UNSPEC;
	__u64 now = bpf_ktime_get_ns();
	if (nat->expires_ns && now >= nat->expires_ns)
		return TC_ACT_UNSPEC;
	// The peer entry learns where its datagrams leave (the client's device) and, for a
	// wildcard listener, the address the client sent to.
	__u32 in_if = skb->ingress_ifindex;
	if (must_teach(nat, in_if, wildcard, old->addrs.daddr)) {
		struct flow_key pk = {
			.saddr = nat->daddr,
			.daddr = nat->saddr,
			.sport = nat->dport,
			.dport = nat->sport,
		};
		struct flow_nat *peer = turn_lookup(&mg_turn_peer, &pk, &pk.daddr, NULL);
		teach(nat, peer, in_if, wildcard, old->addrs.daddr);
	}
	// Until the peer sent once, user space relays (the relay address or the peer's
	// device is not known yet).
	__u32 out_if = nat->ifindex;
	if (nat->saddr == 0 || out_if == 0)
		return TC_ACT_UNSPEC;
	__u32 mtu_len = 0;
	if (bpf_check_mtu(skb, out_if, &mtu_len, -4, 0))
		return TC_ACT_UNSPEC;
	struct flow_nat to = *nat;
	__u32 zero = 0;
	struct turn_scratch *sc = bpf_map_lookup_elem(&mg_turn_scratch, &zero);
	if (!sc)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, TURN_HDR_OFF + 4, sc->buf, clen))
		return TC_ACT_UNSPEC;
	turn_count(nat, clen, now);
	// From here on the datagram is being changed: a failure drops it.
	if (bpf_skb_store_bytes(skb, TURN_HDR_OFF, sc->buf, clen, BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_change_tail(skb, skb->len - 4, 0) || turn_rewrite(skb, old, &to, hdr, 0))
		return TC_ACT_SHOT;
	return deliver(in_if, out_if);
}

// A datagram from a peer with an installed channel: to the client, as ChannelData.
static __always_inline int turn_to_client(struct __sk_buff *skb, const struct turn_old *old,
					  __u32 n)
{
	if (n < 1 || n > TURN_MAX_DATA)
		return TC_ACT_UNSPEC;
	struct flow_key key = old->addrs;
	int wildcard = 0; // a relay socket on 0.0.0.0
	struct flow_nat *nat = turn_lookup(&mg_turn_peer, &key, &key.daddr, &wildcard);
	if (!nat)
		return TC_ACT_UNSPEC;
	__u64 now = bpf_ktime_get_ns();
	if (nat->expires_ns && now >= nat->expires_ns)
		return TC_ACT_UNSPEC;
	// The channel entry learns where its datagrams leave (the peer's device) and, for
	// a wildcard relay socket, the relay address the peer sent to.
	__u32 in_if = skb->ingress_ifindex;
	if (must_teach(nat, in_if, wildcard, old->addrs.daddr)) {
		struct turn_chan_key ck = {
			.saddr = nat->daddr,
			.daddr = nat->saddr,
			.sport = nat->dport,
			.dport = nat->sport,
			.channel = (__u16)nat->channel,
		};
		struct flow_nat *chan = turn_lookup(&mg_turn_chan, &ck, &ck.daddr, NULL);
		teach(nat, chan, in_if, wildcard, old->addrs.daddr);
	}
	__u32 out_if = nat->ifindex;
	if (nat->saddr == 0 || out_if == 0)
		return TC_ACT_UNSPEC;
	__u32 mtu_len = 0;
	if (bpf_check_mtu(skb, out_if, &mtu_len, 4, 0))
		return TC_ACT_UNSPEC;
	struct flow_nat to = *nat;
	// Channel (network order) then length, as the bytes appear on the wire.
	__u16 len_be = bpf_htons((__u16)n);
	__u32 hdr = (__u32)(__u16)nat->channel | ((__u32)len_be << 16);
	__u32 zero = 0;
	struct turn_scratch *sc = bpf_map_lookup_elem(&mg_turn_scratch, &zero);
	if (!sc)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, TURN_HDR_OFF, sc->buf, n))
		return TC_ACT_UNSPEC;
	turn_count(nat, n, now);
	if (bpf_skb_change_tail(skb, skb->len + 4, 0) ||
	    bpf_skb_store_bytes(skb, TURN_HDR_OFF + 4, sc->buf, n, BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_store_bytes(skb, TURN_HDR_OFF, &hdr, sizeof(hdr), BPF_F_RECOMPUTE_CSUM) ||
	    turn_rewrite(skb, old, &to, hdr, 1))
		return TC_ACT_SHOT;
	return deliver(in_if, out_if);
}

// A datagram no UDP session claimed: TURN data, or none of ours.
static __always_inline int turn_ingress(struct __sk_buff *skb)
{
	struct turn_old old = {};
	__u32 payload = turn_parse(skb, &old);
	if (payload == 0)
		return TC_ACT_UNSPEC;
	int r = turn_to_peer(skb, &old, payload);
	if (r != TC_ACT_UNSPEC)
		return r;
	return turn_to_client(skb, &old, payload);
}
