/* A packet through a TUN interface, the way a userspace VPN moves them: create the interface on
 * /dev/net/tun, give it an address and bring it up (NET_ADMIN), write an ICMP echo request from a
 * peer address into it, and read the kernel's echo reply back out of it. The ICMP id and payload
 * are chosen at run time. Run in a pod (its own network namespace) by the e2e suite. */
#include "report.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip_icmp.h>
#include <poll.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define IFNAME "kdptun0"
#define LOCAL "10.99.0.1"
#define PEER "10.99.0.2"

static uint16_t checksum(const void *data, size_t len) {
    const uint8_t *p = data;
    uint32_t sum = 0;
    for (; len > 1; p += 2, len -= 2)
        sum += (uint32_t)(p[0] << 8 | p[1]);
    if (len)
        sum += (uint32_t)(p[0] << 8);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return htons((uint16_t)~sum);
}

static void set_addr(int sock, unsigned long request, const char *step, const char *addr) {
    struct ifreq ifr = {0};
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", IFNAME);
    sin->sin_family = AF_INET;
    inet_pton(AF_INET, addr, &sin->sin_addr);
    if (ioctl(sock, request, &ifr) < 0)
        fail(step, errno);
}

int main(int argc, char **argv) {
    program = "tun-echo";
    maybe_mknod(argc, argv);
    device_cgroup_fact("/dev/net/tun");
    int tun = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (tun < 0)
        fail("open", errno);
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", IFNAME);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    if (ioctl(tun, TUNSETIFF, &ifr) < 0)
        fail("TUNSETIFF", errno);
    fact("if=%s", ifr.ifr_name);

    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        fail("socket", errno);
    set_addr(sock, SIOCSIFADDR, "SIOCSIFADDR", LOCAL);
    set_addr(sock, SIOCSIFNETMASK, "SIOCSIFNETMASK", "255.255.255.0");
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0)
        fail("SIOCGIFFLAGS", errno);
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(sock, SIOCSIFFLAGS, &ifr) < 0)
        fail("SIOCSIFFLAGS", errno);
    fact("addr=%s/24", LOCAL);

    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint16_t id = (uint16_t)(now.tv_nsec ^ getpid());
    struct {
        struct iphdr ip;
        struct icmphdr icmp;
        char payload[16];
    } __attribute__((packed)) req = {0};
    snprintf(req.payload, sizeof req.payload, "kdp-%08lx", (unsigned long)now.tv_nsec);
    req.ip.version = 4;
    req.ip.ihl = 5;
    req.ip.tot_len = htons(sizeof req);
    req.ip.ttl = 64;
    req.ip.protocol = IPPROTO_ICMP;
    inet_pton(AF_INET, PEER, &req.ip.saddr);
    inet_pton(AF_INET, LOCAL, &req.ip.daddr);
    req.ip.check = checksum(&req.ip, sizeof req.ip);
    req.icmp.type = ICMP_ECHO;
    req.icmp.un.echo.id = htons(id);
    req.icmp.un.echo.sequence = htons(1);
    req.icmp.checksum = checksum(&req.icmp, sizeof req.icmp + sizeof req.payload);
    if (write(tun, &req, sizeof req) != (ssize_t)sizeof req)
        fail("write-echo-request", errno);
    fact("sent=%zu", sizeof req);

    /* Other packets may come out first (IPv6 router solicitations on a fresh interface): skip
     * them until our reply, for up to 5 s. */
    int skipped = 0;
    for (;;) {
        struct pollfd pfd = {.fd = tun, .events = POLLIN};
        int n = poll(&pfd, 1, 5000);
        if (n < 0)
            fail("poll", errno);
        if (n == 0) {
            fact("skipped=%d", skipped);
            fail("echo-reply-timeout", 0);
        }
        uint8_t buf[2048];
        ssize_t len = read(tun, buf, sizeof buf);
        if (len < 0)
            fail("read", errno);
        const struct iphdr *ip = (const void *)buf;
        if (len < (ssize_t)sizeof req || ip->version != 4 || ip->protocol != IPPROTO_ICMP) {
            skipped++;
            continue;
        }
        const struct icmphdr *icmp = (const void *)(buf + ip->ihl * 4);
        const char *payload = (const char *)(icmp + 1);
        if (icmp->type != ICMP_ECHOREPLY || ntohs(icmp->un.echo.id) != id ||
            memcmp(payload, req.payload, sizeof req.payload) != 0) {
            skipped++;
            continue;
        }
        char from[INET_ADDRSTRLEN], to[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &ip->saddr, from, sizeof from);
        inet_ntop(AF_INET, &ip->daddr, to, sizeof to);
        fact("reply=%s->%s id=%u received=%zd skipped=%d", from, to, id, len, skipped);
        succeed();
    }
}
