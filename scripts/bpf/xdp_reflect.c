// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// Benchmark tool, not part of mediagate: an echo "worker" that costs no user space. At
// the XDP hook of the echo namespace's veth it sends every UDP datagram to ports
// 7000-7099 straight back where it came from: MACs, IP addresses and ports swapped (the
// IP checksum is unchanged by a swap), UDP checksum set to 0 ("none", valid over IPv4):
// a datagram from a local socket on a veth carries only a partial checksum that the
// device was to finish, which XDP cannot see. scripts/bench-udp-netns.sh compiles it with
// clang -O2 -target bpf and attaches it with `ip link set dev X xdp obj ... sec xdp
// program reflect` (and `program pass` on the peer, see below).
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int reflect(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return XDP_PASS;
	__u16 port = bpf_ntohs(udp->dest);
	if (port < 7000 || port > 7099)
		return XDP_PASS;
	unsigned char mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	__u32 a = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = a;
	__u16 p = udp->source;
	udp->source = udp->dest;
	udp->dest = p;
	udp->check = 0;
	return XDP_TX;
}

// Attached to the veth peer that receives the reflected datagrams: a veth takes XDP_TX
// frames only when its peer runs in NAPI mode, which an XDP program turns on.
SEC("xdp")
int pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
