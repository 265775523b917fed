/*
 * pyhv test guest: reports what the VMM told it (boot protocol, command line,
 * memory map, initrd, ACPI tables, CPUs, NUMA affinity, RTC) as '@' lines on
 * COM1, takes RTC interrupts and sets the clock (pyhv.rtc-irq, pyhv.rtc-set),
 * starts the APs, enumerates PCI (pyhv.pci), brings up USB host controllers
 * (pyhv.usb), moves BARs (pyhv.barmove), drives virtio-rng and virtio-blk
 * (pyhv.virtio), virtio-console (pyhv.virtio-console), virtio-net
 * (pyhv.virtio-net) and virtio-9p (pyhv.virtio-9p), reports CPUID words
 * (pyhv.cpuid), the SMBIOS tables (pyhv.smbios), drives a PCI Express
 * hotplug slot (pyhv.hotplug), then powers off through
 * ACPI.  The grammar is in README.md.
 *
 * Freestanding, 64-bit, identity-mapped low 4 GiB (see entry.S).  Everything
 * here is written for a slow (emulated) CPU: few instructions, few port I/O.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define PROTO_PVH     1
#define PROTO_LINUX64 2
#define PROTO_LINUX32 3

#define MAPPED_LIMIT  0x100000000UL	/* what entry.S identity-maps */
#define AP_TRAMPOLINE 0x10000UL		/* free RAM in pyhv's and QEMU's maps */
#define SCI_VECTOR    0x40
#define DEBUG_EXIT_PORT 0xf4
#define DEBUG_EXIT_VALUE 0x10		/* QEMU exit status (0x10 << 1) | 1 = 33 */

/* ---- low-level helpers --------------------------------------------------- */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)a; }
static inline void wr8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static inline void pause(void) { __asm__ volatile("pause" ::: "memory"); }

static void __attribute__((noreturn)) halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* gcc may emit calls to these even when freestanding */
void *memset(void *d, int c, u64 n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, u64 n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

static int mapped(u64 addr, u64 len)
{
	return addr < MAPPED_LIMIT && len <= MAPPED_LIMIT - addr;
}

/* Wait about `ticks` TSC ticks, but never more than `max_iter` rounds. */
static void delay(u64 ticks, u64 max_iter)
{
	u64 start = rdtsc();
	while (max_iter-- && rdtsc() - start < ticks)
		pause();
}

/* ---- COM1 output -------------------------------------------------------- */

/*
 * The FIFOs are enabled once (FCR), then LSR.THRE (transmit FIFO empty) is
 * polled only before every 16th byte: about one port access per byte.  If
 * THRE never shows up the UART is not polled any more.
 */
static int uart_poll = 1, uart_room;

static void putc_(char c)
{
	if (uart_poll && !uart_room) {
		if (uart_poll == 1) {
			outb(0x3fa, 0x07);	/* FCR: enable and clear FIFOs */
			uart_poll = 2;
		}
		int n = 2000;
		while (!(inb(0x3fd) & 0x20)) {
			if (!--n) {
				uart_poll = 0;	/* THRE never comes: stop asking */
				break;
			}
		}
		uart_room = 16;
	}
	if (uart_room)
		uart_room--;
	outb(0x3f8, (u8)c);
}

static void puts_(const char *s)
{
	while (*s)
		putc_(*s++);
}

static void put_hex(u64 v)
{
	char buf[16];
	int n = 0;
	puts_("0x");
	do {
		buf[n++] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v);
	while (n)
		putc_(buf[--n]);
}

static void put_dec(u64 v)
{
	char buf[20];
	int n = 0;
	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		putc_(buf[--n]);
}

/* exactly n hex digits, no prefix */
static void put_hexn(u64 v, int n)
{
	while (n--)
		putc_("0123456789abcdef"[(v >> (4 * n)) & 15]);
}

static void put_dec2(u32 v)
{
	putc_((char)('0' + v / 10 % 10));
	putc_((char)('0' + v % 10));
}

/* Bytes 0x21..0x7e are printed as they are (and space when allowed), all
 * others and the backslash as \xHH. */
static void put_escaped(const u8 *s, u64 n, int allow_space)
{
	for (u64 i = 0; i < n; i++) {
		u8 c = s[i];
		if ((c > 0x20 && c < 0x7f && c != '\\') || (c == ' ' && allow_space)) {
			putc_((char)c);
		} else {
			putc_('\\');
			putc_('x');
			putc_("0123456789abcdef"[c >> 4]);
			putc_("0123456789abcdef"[c & 15]);
		}
	}
}

static void line(const char *tag) { putc_('@'); puts_(tag); }
static void eol(void) { putc_('\n'); }
static void key(const char *k) { putc_(' '); puts_(k); putc_('='); }

/* pyhv.wait=echo: read one line from COM1 (polling LSR.DR) and report it as
 * "@echo TEXT" (escaped), to check the host's console input path.  Gives up
 * after about 30 s (TSC) with "@echo-timeout". */
static void echo_line(void)
{
	u8 buf[200];
	u64 n = 0, start = rdtsc();
	line("echo-ready");
	eol();
	while (n < sizeof(buf)) {
		if (inb(0x3fd) & 0x01) {
			u8 c = inb(0x3f8);
			if (c == '\n' || c == '\r')
				break;
			buf[n++] = c;
		} else if (rdtsc() - start > 60000000000ull) {
			line("echo-timeout");
			eol();
			return;
		} else {
			for (int i = 0; i < 64; i++)
				pause();
		}
	}
	line("echo ");
	put_escaped(buf, n, 1);
	eol();
}
static void kv_hex(const char *k, u64 v) { key(k); put_hex(v); }
static void kv_dec(const char *k, u64 v) { key(k); put_dec(v); }
static void kv_str(const char *k, const char *v) { key(k); puts_(v); }
static void kv_sig(const char *k, u64 addr) { key(k); put_escaped((const u8 *)addr, 4, 0); }

static void error(const char *what, const char *k, u64 v)
{
	line("error");
	kv_str("what", what);
	if (k)
		kv_hex(k, v);
	eol();
}

/* ---- state gathered while reporting ------------------------------------- */

static struct {
	u32 proto;
	u64 info;
	u64 cmdline;
	u64 rsdp_hint;
	char switches[4096];	/* first part of the command line, NUL-terminated */
} boot;

static struct {
	u64 fadt, madt, dsdt;
	u32 fadt_len, dsdt_len;
	u32 fadt_flags;
	u16 sci_int;
	u32 smi_cmd;
	u8 acpi_enable;
	u32 pm1a_evt, pm1a_cnt;
	u8 pm1_evt_len;
	u8 century;
	u16 pm_tmr;		/* PM timer port (0: none) */
	u8 sleep_space;		/* 0 memory, 1 I/O */
	u64 sleep_ctl;
	u32 slp_typ;
	int have_s5;
	u32 lapic;
	u32 madt_flags;
	u32 ioapic;
	u32 ioapic_gsi_base;
	int have_ioapic;
	u32 sci_gsi;
	u16 sci_flags;
	u32 cpu_ids[256];
	u32 ncpus;
} acpi;

static int in_poweroff;

/* PCI configuration access: ECAM (from the MCFG) or port 0xCF8/0xCFC */
static struct {
	u64 mcfg;		/* the MCFG table, 0: none */
	u32 mcfg_len;
	u64 ecam;		/* ECAM base minus start_bus << 20; 0: use port 0xCF8 */
	u32 last_bus;
	u32 functions, reads, writes;
	u8 seen[256];		/* buses walked */
} pci;

/* ---- boot information ---------------------------------------------------- */

/* Fletcher-style sum over little-endian 32-bit words (last one zero-padded):
 * a = sum of words, b = sum of the running a, both mod 2^32; (b << 32) | a. */
static u64 checksum(u64 addr, u64 n)
{
	const u32 *w = (const u32 *)addr;
	u32 a = 0, b = 0;
	u64 words = n / 4, i;
	for (i = 0; i < words; i++) {
		a += w[i];
		b += a;
	}
	if (n & 3) {
		u32 last = 0;
		const u8 *p = (const u8 *)(addr + words * 4);
		for (u64 j = 0; j < (n & 3); j++)
			last |= (u32)p[j] << (8 * j);
		a += last;
		b += a;
	}
	return ((u64)b << 32) | a;
}

static void report_blob(const char *tag, long index, u64 addr, u64 size)
{
	line(tag);
	if (index >= 0)
		kv_dec("index", (u64)index);
	kv_hex("addr", addr);
	kv_hex("size", size);
	if (mapped(addr, size))
		kv_hex("csum", checksum(addr, size));
	else
		kv_str("csum", "unmapped");
	eol();
}

static void report_cmdline(void)
{
	u64 p = boot.cmdline, n = 0;
	line("cmdline");
	if (p && mapped(p, 0x10000)) {
		while (n < 0x10000 && rd8(p + n))
			n++;
		putc_(' ');
		put_escaped((const u8 *)p, n, 1);
		for (u64 i = 0; i < n && i < sizeof(boot.switches) - 1; i++)
			boot.switches[i] = (char)rd8(p + i);
	}
	eol();
	if (p && !mapped(p, 0x10000))
		error("cmdline-unmapped", "addr", p);
}

static void report_e820(u64 addr, u64 size, u32 type)
{
	line("e820");
	kv_hex("addr", addr);
	kv_hex("size", size);
	kv_dec("type", type);
	eol();
}

static void report_pvh(u64 si)
{
	u32 magic = rd32(si), version = rd32(si + 4), nmods = rd32(si + 12);
	line("bootinfo");
	kv_hex("magic", magic);
	kv_dec("version", version);
	kv_hex("flags", rd32(si + 8));
	kv_dec("nr_modules", nmods);
	eol();
	if (magic != 0x336ec578) {
		error("bad-start-info-magic", "magic", magic);
		return;
	}
	boot.cmdline = rd64(si + 24);
	boot.rsdp_hint = rd64(si + 32);
	report_cmdline();

	u64 memmap = version >= 1 ? rd64(si + 40) : 0;
	u32 entries = version >= 1 ? rd32(si + 48) : 0;
	line("memmap");
	kv_str("source", "pvh");
	kv_dec("count", entries);
	eol();
	if (memmap && mapped(memmap, (u64)entries * 24))
		for (u32 i = 0; i < entries; i++)
			report_e820(rd64(memmap + i * 24), rd64(memmap + i * 24 + 8), rd32(memmap + i * 24 + 16));

	u64 mods = rd64(si + 16);
	if (nmods && mapped(mods, (u64)nmods * 32)) {
		report_blob("initrd", -1, rd64(mods), rd64(mods + 8));
		for (u32 i = 0; i < nmods && i < 64; i++) {
			u64 m = mods + i * 32;
			report_blob("module", i, rd64(m), rd64(m + 8));
		}
	} else {
		line("initrd");
		kv_str("addr", "none");
		eol();
	}
}

static void report_linux(u64 bp)
{
	line("bootinfo");
	kv_hex("header", rd32(bp + 0x202));
	kv_hex("version", rd16(bp + 0x206));
	kv_hex("type_of_loader", rd8(bp + 0x210));
	kv_hex("loadflags", rd8(bp + 0x211));
	kv_hex("boot_flag", rd16(bp + 0x1fe));
	kv_hex("cmdline_size", rd32(bp + 0x238));
	kv_hex("code32_start", rd32(bp + 0x214));
	eol();

	boot.cmdline = rd32(bp + 0x228) | ((u64)rd32(bp + 0x0c8) << 32);
	boot.rsdp_hint = rd64(bp + 0x070);
	report_cmdline();

	u32 entries = rd8(bp + 0x1e8);
	if (entries > 128)
		entries = 128;
	line("memmap");
	kv_str("source", "e820");
	kv_dec("count", entries);
	eol();
	for (u32 i = 0; i < entries; i++) {
		u64 e = bp + 0x2d0 + i * 20;
		report_e820(rd64(e), rd64(e + 8), rd32(e + 16));
	}

	u64 rd = rd32(bp + 0x218) | ((u64)rd32(bp + 0x0c0) << 32);
	u64 rs = rd32(bp + 0x21c) | ((u64)rd32(bp + 0x0c4) << 32);
	if (rd && rs) {
		report_blob("initrd", -1, rd, rs);
	} else {
		line("initrd");
		kv_str("addr", "none");
		eol();
	}
}

static int has_switch(const char *sw)
{
	const char *s = boot.switches;
	u64 n = 0;
	while (sw[n])
		n++;
	while (*s) {
		while (*s == ' ')
			s++;
		const char *t = s;
		while (*t && *t != ' ')
			t++;
		if ((u64)(t - s) == n && !memcmp(s, sw, n))
			return 1;
		s = t;
	}
	return 0;
}

/* ---- ACPI ---------------------------------------------------------------- */

static int sum_ok(u64 addr, u64 len)
{
	u8 s = 0;
	const u8 *p = (const u8 *)addr;
	for (u64 i = 0; i < len; i++)
		s += p[i];
	return s == 0;
}

static u64 rsdp_at(u64 a)
{
	/* "RSD PTR " */
	if (rd64(a) == 0x2052545020445352UL && sum_ok(a, 20))
		return a;
	return 0;
}

static u64 scan_rsdp(void)
{
	u64 ebda = (u64)rd16(0x40e) << 4, a, r;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		for (a = ebda; a < ebda + 1024; a += 16)
			if ((r = rsdp_at(a)))
				return r;
	for (a = 0xe0000; a < 0x100000; a += 16)
		if ((r = rsdp_at(a)))
			return r;
	return 0;
}

/* Print one table; returns its length, or 0 when it cannot be read. */
static u32 report_table(u64 addr, const char *parent)
{
	line("acpi-table");
	if (!addr || !mapped(addr, 36)) {
		kv_hex("addr", addr);
		kv_str("parent", parent);
		kv_str("error", "unmapped");
		eol();
		return 0;
	}
	u32 len = rd32(addr + 4);
	kv_sig("sig", addr);
	kv_hex("addr", addr);
	kv_hex("len", len);
	kv_dec("revision", rd8(addr + 8));
	if (len < 36 || len > (64u << 20) || !mapped(addr, len))
		kv_str("checksum", "skipped");
	else
		kv_str("checksum", sum_ok(addr, len) ? "ok" : "bad");
	kv_str("parent", parent);
	eol();
	return len < 36 || !mapped(addr, len) ? 0 : len;
}

static u64 pkg_len_skip(u64 p)
{
	u8 lead = rd8(p);
	return p + 1 + (lead >> 6);
}

static void find_s5(void)
{
	u64 d = acpi.dsdt, end = acpi.dsdt + acpi.dsdt_len;
	for (u64 p = d + 36; p + 8 < end; p++) {
		if (rd32(p) != 0x5f35535f)	/* "_S5_" */
			continue;
		if (rd8(p + 4) != 0x12)		/* PackageOp */
			continue;
		u64 q = pkg_len_skip(p + 5) + 1;	/* skip PkgLength, NumElements */
		u8 op = rd8(q);
		if (op == 0x0a)
			acpi.slp_typ = rd8(q + 1);
		else if (op == 0x0b)
			acpi.slp_typ = rd16(q + 1);
		else if (op == 0x0c)
			acpi.slp_typ = rd32(q + 1);
		else if (op == 0x00 || op == 0x01)
			acpi.slp_typ = op;
		else
			continue;
		acpi.have_s5 = 1;
		return;
	}
}

static void parse_fadt(u64 f, u32 len)
{
	acpi.fadt = f;
	acpi.fadt_len = len;
#define FHAS(off, size) (len >= (u32)((off) + (size)))
	acpi.sci_int = rd16(f + 46);
	acpi.smi_cmd = rd32(f + 48);
	acpi.acpi_enable = rd8(f + 52);
	acpi.pm1a_evt = rd32(f + 56);
	acpi.pm1a_cnt = rd32(f + 64);
	acpi.pm1_evt_len = rd8(f + 88);
	acpi.century = FHAS(108, 1) ? rd8(f + 108) : 0;
	acpi.pm_tmr = (u16)rd32(f + 76);
	if (FHAS(220, 0) && rd8(f + 208) == 1 && rd64(f + 212))
		acpi.pm_tmr = (u16)rd64(f + 212);
	acpi.fadt_flags = FHAS(112, 4) ? rd32(f + 112) : 0;
	acpi.dsdt = rd32(f + 40);
	if (FHAS(140, 8) && rd64(f + 140))
		acpi.dsdt = rd64(f + 140);
	if (FHAS(160, 0) && rd8(f + 148) == 1 && rd64(f + 152))
		acpi.pm1a_evt = (u32)rd64(f + 152);
	if (FHAS(184, 0) && rd8(f + 172) == 1 && rd64(f + 176))
		acpi.pm1a_cnt = (u32)rd64(f + 176);
	if (FHAS(256, 0) && rd64(f + 248) && rd8(f + 244) <= 1) {
		acpi.sleep_space = rd8(f + 244);
		acpi.sleep_ctl = rd64(f + 248);
	}
#undef FHAS
}

static void parse_madt(u64 m, u32 len)
{
	acpi.madt = m;
	acpi.lapic = rd32(m + 36);
	acpi.madt_flags = rd32(m + 40);
	for (u64 p = m + 44; p + 2 <= m + len;) {
		u8 type = rd8(p), l = rd8(p + 1);
		if (l < 2)
			break;
		if (type == 0 || type == 9) {
			u32 id = type == 0 ? rd8(p + 3) : rd32(p + 4);
			u32 uid = type == 0 ? rd8(p + 2) : rd32(p + 12);
			u32 fl = type == 0 ? rd32(p + 4) : rd32(p + 8);
			line("cpu");
			kv_str("type", type == 0 ? "lapic" : "x2apic");
			kv_dec("uid", uid);
			kv_dec("apic_id", id);
			kv_hex("flags", fl);
			eol();
			if ((fl & 1) && acpi.ncpus < 256)
				acpi.cpu_ids[acpi.ncpus++] = id;
		} else if (type == 1) {
			line("ioapic");
			kv_dec("id", rd8(p + 2));
			kv_hex("addr", rd32(p + 4));
			kv_dec("gsi_base", rd32(p + 8));
			eol();
			if (!acpi.have_ioapic) {
				acpi.have_ioapic = 1;
				acpi.ioapic = rd32(p + 4);
				acpi.ioapic_gsi_base = rd32(p + 8);
			}
		} else if (type == 2) {
			line("irq-override");
			kv_dec("bus", rd8(p + 2));
			kv_dec("source", rd8(p + 3));
			kv_dec("gsi", rd32(p + 4));
			kv_hex("flags", rd16(p + 8));
			eol();
		} else if (type == 5 && l >= 12) {
			acpi.lapic = (u32)rd64(p + 4);
		}
		p += l;
	}
	line("cpus");
	kv_dec("count", acpi.ncpus);
	key("apic_ids");
	for (u32 i = 0; i < acpi.ncpus; i++) {
		if (i)
			putc_(',');
		put_dec(acpi.cpu_ids[i]);
	}
	kv_hex("lapic", acpi.lapic);
	kv_hex("flags", acpi.madt_flags);
	eol();
}

/* SCI GSI and polarity/trigger flags, after the MADT interrupt overrides */
static void sci_routing(void)
{
	acpi.sci_gsi = acpi.sci_int;
	acpi.sci_flags = 0;
	if (!acpi.madt)
		return;
	u64 m = acpi.madt, end = m + rd32(m + 4);
	for (u64 p = m + 44; p + 2 <= end;) {
		u8 l = rd8(p + 1);
		if (l < 2)
			break;
		if (rd8(p) == 2 && rd8(p + 3) == acpi.sci_int) {
			acpi.sci_gsi = rd32(p + 4);
			acpi.sci_flags = rd16(p + 8);
		}
		p += l;
	}
}

/* SRAT (pyhv and QEMU with guest NUMA): each CPU's and memory range's
 * proximity domain; SLIT: the distance matrix, row by row */
static u64 srat_table, slit_table;

static void report_srat(u64 t)
{
	u64 end = t + rd32(t + 4);
	for (u64 p = t + 48; p + 2 <= end;) {
		u8 type = rd8(p), l = rd8(p + 1);
		if (l < 2)
			break;
		if (type == 0 && l >= 16) {		/* local APIC affinity */
			line("srat-cpu");
			kv_dec("apic", rd8(p + 3));
			kv_dec("domain", rd8(p + 2) | (u32)rd8(p + 9) << 8 | (u32)rd16(p + 10) << 16);
			kv_dec("enabled", rd32(p + 4) & 1);
			eol();
		} else if (type == 2 && l >= 24) {	/* x2APIC affinity */
			line("srat-cpu");
			kv_dec("apic", rd32(p + 8));
			kv_dec("domain", rd32(p + 4));
			kv_dec("enabled", rd32(p + 12) & 1);
			eol();
		} else if (type == 1 && l >= 40) {	/* memory affinity */
			line("srat-mem");
			kv_dec("domain", rd32(p + 2));
			kv_hex("base", rd64(p + 8));
			kv_hex("len", rd64(p + 16));
			kv_dec("enabled", rd32(p + 28) & 1);
			eol();
		}
		p += l;
	}
	if (!slit_table)
		return;
	u64 n = rd64(slit_table + 36);
	line("slit");
	kv_dec("localities", n);
	key("distances");
	for (u64 i = 0; i < n * n && i < 64 * 64 && 44 + i < rd32(slit_table + 4); i++) {
		if (i)
			putc_(',');
		put_dec(rd8(slit_table + 44 + i));
	}
	eol();
}

static void report_acpi(void)
{
	u64 rsdp = 0;
	const char *source = "none";
	if (boot.rsdp_hint && mapped(boot.rsdp_hint, 36)) {
		rsdp = boot.rsdp_hint;
		source = "bootinfo";
	} else if ((rsdp = scan_rsdp())) {
		source = "scan";
	}
	line("acpi-rsdp");
	kv_str("source", source);
	if (!rsdp) {
		eol();
		return;
	}
	u8 rev = rd8(rsdp + 15);
	u64 rsdt = rd32(rsdp + 16), xsdt = rev >= 2 ? rd64(rsdp + 24) : 0;
	kv_hex("addr", rsdp);
	kv_dec("revision", rev);
	key("oem");
	put_escaped((const u8 *)(rsdp + 9), 6, 0);
	kv_hex("rsdt", rsdt);
	kv_hex("xsdt", xsdt);
	kv_str("checksum", rd64(rsdp) == 0x2052545020445352UL && sum_ok(rsdp, 20) ? "ok" : "bad");
	if (rev >= 2)
		kv_str("xchecksum", sum_ok(rsdp, rd32(rsdp + 20) < 36 ? 36 : rd32(rsdp + 20)) ? "ok" : "bad");
	eol();

	int x = xsdt && mapped(xsdt, 36);
	u64 sdt = x ? xsdt : rsdt;
	u32 len = report_table(sdt, "RSDP");
	if (!len)
		return;
	u32 esz = x ? 8 : 4;
	const char *parent = x ? "XSDT" : "RSDT";
	for (u64 p = sdt + 36; p + esz <= sdt + len; p += esz) {
		u64 t = x ? rd64(p) : rd32(p);
		u32 tl = report_table(t, parent);
		if (!tl)
			continue;
		u32 sig = rd32(t);
		if (sig == 0x50434146 && !acpi.fadt)		/* "FACP" */
			parse_fadt(t, tl);
		else if (sig == 0x43495041 && !acpi.madt)	/* "APIC" */
			acpi.madt = t;
		else if (sig == 0x4746434d && !pci.mcfg) {	/* "MCFG" */
			pci.mcfg = t;
			pci.mcfg_len = tl;
		} else if (sig == 0x54415253 && !srat_table)	/* "SRAT" */
			srat_table = t;
		else if (sig == 0x54494c53 && !slit_table)	/* "SLIT" */
			slit_table = t;
	}
	if (acpi.fadt) {
		acpi.dsdt_len = report_table(acpi.dsdt, "FACP");
		if (acpi.dsdt_len)
			find_s5();
		line("acpi-fadt");
		kv_hex("flags", acpi.fadt_flags);
		kv_dec("hw_reduced", (acpi.fadt_flags >> 20) & 1);
		kv_dec("sci_int", acpi.sci_int);
		kv_hex("smi_cmd", acpi.smi_cmd);
		kv_hex("pm1a_evt", acpi.pm1a_evt);
		kv_hex("pm1a_cnt", acpi.pm1a_cnt);
		kv_hex("sleep_control", acpi.sleep_ctl);
		kv_dec("sleep_control_space", acpi.sleep_space);
		kv_hex("century", acpi.century);
		eol();
		line("acpi-s5");
		kv_dec("found", acpi.have_s5);
		kv_dec("slp_typ", acpi.slp_typ);
		eol();
	}
	if (acpi.madt)
		parse_madt(acpi.madt, rd32(acpi.madt + 4));
	if (srat_table)
		report_srat(srat_table);
	sci_routing();
}

/* ---- local APIC, APs ---------------------------------------------------- */

static int x2apic;

static u32 lapic_read(u32 reg)
{
	if (x2apic)
		return (u32)rdmsr(0x800 + (reg >> 4));
	return rd32((u64)acpi.lapic + reg);
}

static void lapic_write(u32 reg, u32 v)
{
	if (x2apic)
		wrmsr(0x800 + (reg >> 4), v);
	else
		wr32((u64)acpi.lapic + reg, v);
}

static u32 lapic_id(void)
{
	return x2apic ? lapic_read(0x20) : lapic_read(0x20) >> 24;
}

static void send_ipi(u32 dest, u32 low)
{
	if (x2apic) {
		wrmsr(0x830, ((u64)dest << 32) | low);
		return;
	}
	lapic_write(0x310, dest << 24);
	lapic_write(0x300, low);
	for (int i = 0; i < 1000 && (lapic_read(0x300) & (1 << 12)); i++)
		pause();
}

static void lapic_setup(void)
{
	u64 base = rdmsr(0x1b);
	x2apic = (base & (3 << 10)) == (3 << 10);
	if (!acpi.lapic)
		acpi.lapic = 0xfee00000;
}

extern const u8 ap_tramp_start[], ap_tramp_end[], ap_tramp_counter[];

static void start_aps(void)
{
	u32 expected = 0, bsp;
	u64 counter = AP_TRAMPOLINE + (u64)(ap_tramp_counter - ap_tramp_start);
	line("ap");
	if (acpi.ncpus < 2) {
		kv_dec("expected", 0);
		kv_dec("started", 0);
		eol();
		return;
	}
	lapic_setup();
	bsp = lapic_id();
	memcpy((void *)AP_TRAMPOLINE, ap_tramp_start, (u64)(ap_tramp_end - ap_tramp_start));
	wr32(counter, 0);
	for (u32 i = 0; i < acpi.ncpus; i++) {
		u32 id = acpi.cpu_ids[i];
		if (id == bsp || (!x2apic && id > 254))
			continue;
		expected++;
		send_ipi(id, 0x4500);				/* INIT, assert */
		send_ipi(id, 0x4600 | (AP_TRAMPOLINE >> 12));	/* STARTUP */
		send_ipi(id, 0x4600 | (AP_TRAMPOLINE >> 12));
	}
	/* about 2 s at 1-3 GHz TSC, and a cap in case the TSC does not move */
	u64 start = rdtsc();
	for (u64 n = 0; n < 2000000 && rd32(counter) < expected; n++) {
		if (rdtsc() - start > 4000000000UL)
			break;
		pause();
	}
	kv_dec("expected", expected);
	kv_dec("started", rd32(counter));
	kv_dec("bsp_apic_id", bsp);
	kv_str("mode", x2apic ? "x2apic" : "xapic");
	eol();
}

/* ---- RTC --------------------------------------------------------------- */

static u8 cmos(u8 reg)
{
	outb(0x70, reg);
	return inb(0x71);
}

static u32 bcd(u32 v) { return (v >> 4) * 10 + (v & 15); }

static void report_rtc(void)
{
	if (cmos(0x0b) == 0xff) {	/* floating bus: no RTC */
		line("rtc none");
		eol();
		return;
	}
	for (int i = 0; i < 1000 && (cmos(0x0a) & 0x80); i++)
		pause();
	u32 sec = cmos(0), min = cmos(2), hour = cmos(4), day = cmos(7), mon = cmos(8), year = cmos(9);
	u8 b = cmos(0x0b);
	u32 cent = acpi.century ? cmos(acpi.century) : 0;
	u32 pm = hour & 0x80;
	hour &= 0x7f;
	if (!(b & 4)) {
		sec = bcd(sec);
		min = bcd(min);
		hour = bcd(hour);
		day = bcd(day);
		mon = bcd(mon);
		year = bcd(year);
		cent = bcd(cent);
	}
	if (!(b & 2)) {
		if (hour == 12)
			hour = 0;
		if (pm)
			hour += 12;
	}
	year += (cent >= 19 && cent <= 99) ? cent * 100 : 2000;
	line("rtc ");
	put_dec(year);
	putc_('-');
	put_dec2(mon);
	putc_('-');
	put_dec2(day);
	putc_(' ');
	put_dec2(hour);
	putc_(':');
	put_dec2(min);
	putc_(':');
	put_dec2(sec);
	eol();
}

/* ---- PCI (pyhv.pci) ------------------------------------------------------ */

/*
 * Enumerate PCI as an OS does: bus 0 first, every slot's function 0 (vendor
 * 0xFFFF or 0: nothing there), functions 1-7 only when function 0's header
 * says multifunction, and through each bridge to the secondary bus as it is
 * programmed (behind a PCI Express root or downstream port only device 0, as
 * Linux does).  BARs are sized with decoding off (except on host bridges, as
 * Linux) and every register is restored.  `bdf` is bus << 8 | devfn; config
 * registers are read as aligned dwords only.
 */
static u32 cfg_rd(u32 bdf, u32 reg)
{
	pci.reads++;
	if (pci.ecam)
		return rd32(pci.ecam + ((u64)bdf << 12) + reg);
	outl(0xcf8, 0x80000000u | bdf << 8 | reg);
	return inl(0xcfc);
}

static void cfg_wr(u32 bdf, u32 reg, u32 v)
{
	pci.writes++;
	if (pci.ecam) {
		wr32(pci.ecam + ((u64)bdf << 12) + reg, v);
		return;
	}
	outl(0xcf8, 0x80000000u | bdf << 8 | reg);
	outl(0xcfc, v);
}

/*
 * What pyhv.usb and pyhv.barmove need from the walk: every assigned BAR and
 * open bridge window (to find free room), each bridge's windows and parent,
 * and the USB host controllers (class 0c03) with the BAR their interface
 * uses.  Only memory is touched: no configuration access is added.
 */
#define MAX_RANGES 128
#define MAX_BRIDGES 32
#define MAX_USB 8

static struct { u64 base, end; int io, bridge; } ranges[MAX_RANGES];	/* end exclusive */
static struct { int parent; u64 win[3][2]; } bridges[MAX_BRIDGES];	/* io, mem, pref */
static struct usbhc {
	u32 bdf, cls;
	int parent;		/* bridges[] index, -1: bus 0 */
	u32 bar, flags;		/* the interface's BAR and its low register bits */
	int io, is64, pref;
	u64 addr, size;
} usb[MAX_USB];
static u32 nranges, nbridges, nusb;
static struct { u32 index; u64 value, size; } fbars[6];	/* the last function's */
static u32 nfbars;
static int pci_parent = -1;

/* pyhv.virtio: the modern virtio functions found (vendor 0x1af4, device
 * 0x1040-0x107f) and their BARs as the walk read them */
#define MAX_VIRTIO 4
static struct vdevrec {
	u32 bdf, id;
	u64 value[6], size[6];	/* BAR register(s) with flags, size; 0: none */
} vdevs[MAX_VIRTIO];
static u32 nvirtio;

static void note_range(u64 base, u64 size, int io, int bridge)
{
	if (nranges < MAX_RANGES && size) {
		ranges[nranges].base = base;
		ranges[nranges].end = base + size;
		ranges[nranges].io = io;
		ranges[nranges++].bridge = bridge;
	}
}

static void note_bars(void)
{
	for (u32 i = 0; i < nfbars; i++) {
		u64 v = fbars[i].value, a = v & (v & 1 ? ~3ul : ~15ul);
		if (a)
			note_range(a, fbars[i].size, (int)(v & 1), -1);
	}
}

static int pci_note_bridge(u64 win[3][2])
{
	note_bars();
	if (nbridges >= MAX_BRIDGES)
		return -1;
	int me = (int)nbridges++;
	bridges[me].parent = pci_parent;
	for (int k = 0; k < 3; k++) {
		bridges[me].win[k][0] = win[k][0];
		bridges[me].win[k][1] = win[k][1];
		if (win[k][0] <= win[k][1])
			note_range(win[k][0], win[k][1] - win[k][0] + 1, k == 0, me);
	}
	return me;
}

static void pci_note_device(u32 bdf, u32 cls)
{
	note_bars();
	if ((cls >> 16) != 0x0c03 || nusb >= MAX_USB)
		return;
	struct usbhc *u = &usb[nusb++];
	u->bdf = bdf;
	u->cls = cls >> 8;
	u->parent = pci_parent;
	u->bar = (cls >> 8 & 0xff) == 0x00 ? 4 : 0;	/* UHCI: I/O at BAR 4 */
	u->size = 0;
	for (u32 i = 0; i < nfbars; i++) {
		if (fbars[i].index != u->bar)
			continue;
		u64 v = fbars[i].value;
		u->io = (int)(v & 1);
		u->is64 = !u->io && (v & 6) == 4;
		u->pref = !u->io && (v & 8);
		u->flags = (u32)v & (u->io ? 3 : 15);
		u->addr = v & ~(u64)(u->io ? 3 : 15);
		u->size = fbars[i].size;
	}
}

static void pci_note_virtio(u32 bdf, u32 id)
{
	u32 dev = id >> 16;
	if ((id & 0xffff) != 0x1af4 || dev < 0x1040 || dev > 0x107f || nvirtio >= MAX_VIRTIO)
		return;
	struct vdevrec *d = &vdevs[nvirtio++];
	d->bdf = bdf;
	d->id = id;
	for (u32 i = 0; i < nfbars; i++) {
		d->value[fbars[i].index] = fbars[i].value;
		d->size[fbars[i].index] = fbars[i].size;
	}
}

static void pci_window(const char *k, u64 base, u64 limit)
{
	key(k);
	if (base > limit) {
		puts_("closed");
		return;
	}
	put_hex(base);
	putc_('-');
	put_hex(limit);
}

/* Standard sizing: save, write all-ones, read back, restore (64-bit BARs in
 * two registers).  Prints " barN=VALUE+SIZE", VALUE the programmed register
 * (flag bits included).  Unimplemented BARs (read back 0) are not printed. */
static void pci_bars(u32 bdf, u32 n)
{
	for (u32 i = 0; i < n; i++) {
		u32 reg = 0x10 + 4 * i, index = i;
		u32 lo = cfg_rd(bdf, reg);
		cfg_wr(bdf, reg, ~0u);
		u32 mlo = cfg_rd(bdf, reg);
		cfg_wr(bdf, reg, lo);
		if (!mlo)
			continue;
		u64 val = lo, mask = mlo & (mlo & 1 ? ~3u : ~15u);
		if ((mlo & 7) == 4 && i + 1 < n) {	/* memory, 64-bit */
			u32 hi = cfg_rd(bdf, reg + 4);
			cfg_wr(bdf, reg + 4, ~0u);
			u32 mhi = cfg_rd(bdf, reg + 4);
			cfg_wr(bdf, reg + 4, hi);
			val |= (u64)hi << 32;
			mask |= (u64)mhi << 32;
			i++;
		}
		putc_(' ');
		puts_("bar");
		putc_((char)('0' + index));
		putc_('=');
		put_hex(val);
		putc_('+');
		put_hex(mask & -mask);
		fbars[nfbars].index = index;
		fbars[nfbars].value = val;
		fbars[nfbars++].size = mask & -mask;
	}
}

static void pci_bus(u32 bus, int one_device, int depth);

/* Report one function (and what is behind it); returns its header type. */
static u32 pci_function(u32 bdf, u32 id, int depth)
{
	u32 cls = cfg_rd(bdf, 0x08);
	u32 hdr = (cfg_rd(bdf, 0x0c) >> 16) & 0xff, type = hdr & 0x7f;
	u32 cmd = cfg_rd(bdf, 0x04);	/* command | status << 16 */
	u32 irq = cfg_rd(bdf, 0x3c);
	u32 buses = 0, pcie_type = 0, ncaps = 0;
	u64 win[3][2];
	int me = -1;
	pci.functions++;
	nfbars = 0;
	line("pci");
	key("bdf");
	put_hexn(bdf >> 8, 2);
	putc_(':');
	put_hexn((bdf >> 3) & 31, 2);
	putc_('.');
	putc_((char)('0' + (bdf & 7)));
	key("id");
	put_hexn(id & 0xffff, 4);
	putc_(':');
	put_hexn(id >> 16, 4);
	key("class");
	put_hexn(cls >> 8, 6);
	kv_hex("hdr", hdr);
	kv_dec("pin", (irq >> 8) & 0xff);
	kv_dec("line", irq & 0xff);
	key("cmd");
	puts_("0x");
	put_hexn(cmd & 0xffff, 4);
	if (type <= 1) {
		int off = (cmd & 3) && (cls >> 16) != 0x0600;	/* not on host bridges */
		if (off)
			cfg_wr(bdf, 0x04, cmd & 0xfffc);	/* status half 0: clears nothing */
		pci_bars(bdf, type ? 2 : 6);
		if (off)
			cfg_wr(bdf, 0x04, cmd & 0xffff);
	}
	if (type == 1) {
		buses = cfg_rd(bdf, 0x18);
		kv_hex("pri", buses & 0xff);
		kv_hex("sec", (buses >> 8) & 0xff);
		kv_hex("sub", (buses >> 16) & 0xff);
		u32 io = cfg_rd(bdf, 0x1c);
		u64 base = (io & 0xf0) << 8, limit = (io & 0xf000) | 0xfff;
		if ((io & 0xf) == 1) {		/* 32-bit I/O addressing */
			u32 up = cfg_rd(bdf, 0x30);
			base |= (u64)(up & 0xffff) << 16;
			limit |= (u64)(up >> 16) << 16;
		}
		pci_window("io", base, limit);
		win[0][0] = base;
		win[0][1] = limit;
		u32 mem = cfg_rd(bdf, 0x20);
		win[1][0] = (u64)(mem & 0xfff0) << 16;
		win[1][1] = ((u64)(mem >> 16 & 0xfff0) << 16) | 0xfffff;
		pci_window("mem", win[1][0], win[1][1]);
		u32 pf = cfg_rd(bdf, 0x24);
		base = (u64)(pf & 0xfff0) << 16;
		limit = ((u64)(pf >> 16 & 0xfff0) << 16) | 0xfffff;
		if ((pf & 0xf) == 1) {		/* 64-bit prefetchable */
			base |= (u64)cfg_rd(bdf, 0x28) << 32;
			limit |= (u64)cfg_rd(bdf, 0x2c) << 32;
		}
		pci_window("pref", base, limit);
		win[2][0] = base;
		win[2][1] = limit;
		me = pci_note_bridge(win);
	}
	key("caps");
	if (type <= 1 && (cmd & (0x10 << 16))) {	/* status: capabilities list */
		u32 p = cfg_rd(bdf, 0x34) & 0xfc;
		for (; p >= 0x40 && ncaps < 48; ncaps++) {
			u32 c = cfg_rd(bdf, p);
			if (ncaps)
				putc_(',');
			put_hexn(c & 0xff, 2);
			if ((c & 0xff) == 0x10)		/* PCI Express: device/port type */
				pcie_type = (c >> 20) & 0xf;
			p = (c >> 8) & 0xfc;
		}
	}
	if (!ncaps)
		puts_("none");
	eol();
	if (type == 0) {
		pci_note_device(bdf, cls);
		pci_note_virtio(bdf, id);
	}
	if (type == 1) {
		u32 bus = bdf >> 8, sec = (buses >> 8) & 0xff;
		if (sec <= bus || sec > pci.last_bus || pci.seen[sec] || depth >= 32)
			error("pci-bad-secondary-bus", "bus", sec);
		else {
			int up = pci_parent;
			pci_parent = me;
			pci_bus(sec, pcie_type == 4 || pcie_type == 6, depth + 1);
			pci_parent = up;
		}
	}
	return hdr;
}

static void pci_bus(u32 bus, int one_device, int depth)
{
	pci.seen[bus] = 1;
	for (u32 dev = 0; dev < (one_device ? 1u : 32u); dev++) {
		u32 bdf = bus << 8 | dev << 3;
		u32 id = cfg_rd(bdf, 0);
		if ((id & 0xffff) == 0xffff || !(id & 0xffff))
			continue;
		if (!(pci_function(bdf, id, depth) & 0x80))
			continue;
		for (u32 f = 1; f < 8; f++) {
			id = cfg_rd(bdf | f, 0);
			if ((id & 0xffff) != 0xffff && (id & 0xffff))
				pci_function(bdf | f, id, depth);
		}
	}
}

static void report_pci(void)
{
	u64 m = pci.mcfg;
	pci.last_bus = 255;
	line("pci-config");
	/* the first MCFG allocation for segment 0 starting at bus 0 */
	for (u64 p = m + 44; m && p + 16 <= m + pci.mcfg_len; p += 16) {
		u64 base = rd64(p);
		u32 first = rd8(p + 10), last = rd8(p + 11);
		if (rd16(p + 8) || first || !base || !mapped(base, (u64)(last + 1) << 20))
			continue;
		pci.ecam = base;
		pci.last_bus = last;
		break;
	}
	kv_str("method", pci.ecam ? "ecam" : "io");
	if (pci.ecam)
		kv_hex("addr", pci.ecam);
	kv_dec("last_bus", pci.last_bus);
	eol();
	pci_bus(0, 0, 0);
	line("pci-end");
	kv_dec("functions", pci.functions);
	kv_dec("reads", pci.reads);
	kv_dec("writes", pci.writes);
	eol();
}

/* ---- USB host controllers (pyhv.usb) ------------------------------------- */

/*
 * Each controller the walk found is brought up the way Linux's driver does
 * (uhci_hcd, ehci_hcd, xhci_hcd) and every step's registers are reported as
 * "@usb-step hc=N step=NAME ...".  Waits use the ACPI PM timer; every poll is
 * bounded (4000 rounds and a time limit) and reports the rounds it took.
 *
 * DMA memory: DMA_SIZE bytes from the first page boundary after the image's
 * .bss, cleared once (rep stosq) before the first controller is touched.
 */
extern u8 __memory_end[];

#define DMA_SIZE	0x8000
#define DMA_FRAMES	0x0000		/* UHCI frame list: 1024 dwords */
#define DMA_DCBAA	0x1000		/* xHCI device context base address array (256) */
#define DMA_SPARRAY	0x1800		/* xHCI scratchpad buffer array */
#define DMA_CMDRING	0x1900		/* xHCI command ring: 6 TRBs, the last a Link */
#define DMA_EVRING	0x1a00		/* xHCI event ring segment: 16 TRBs */
#define DMA_ERST	0x1b00		/* xHCI event ring segment table: 1 entry */
#define DMA_SCRATCH	0x2000		/* xHCI scratchpad buffers, a page each */
#define XHCI_MAX_SCRATCH ((DMA_SIZE - DMA_SCRATCH) >> 12)
#define EV_TRBS		16

static u64 dma;

static u32 pm_ticks(void)
{
	return acpi.pm_tmr ? inl(acpi.pm_tmr) & 0xffffff : 0;
}

/* Wait `us` microseconds by the PM timer (3.579545 MHz, 24 bits). */
static void udelay(u32 us)
{
	if (!acpi.pm_tmr) {
		delay((u64)us * 3000, (u64)us * 4);
		return;
	}
	u32 t0 = pm_ticks(), want = (u32)((u64)us * 3579545 / 1000000) + 1;
	for (u32 n = 0; n < 200000 && ((pm_ticks() - t0) & 0xffffff) < want; n++)
		;
}

/* Poll until `done` holds, for at most about `ms` milliseconds and 4000
 * rounds; the value is the rounds it took, 4000 when it never held. */
#define POLL(done, ms) ({							\
	u32 _n = 0, _t0 = pm_ticks();						\
	while (!(done) && _n < 4000 &&						\
	       ((pm_ticks() - _t0) & 0xffffff) < (u32)(ms) * 3580)		\
		_n++;								\
	(done) ? _n : 4000u; })

static void wr64lh(u64 a, u64 v)
{
	wr32(a, (u32)v);
	wr32(a + 4, (u32)(v >> 32));
}

/* a byte or 16-bit configuration write (ECAM, or mechanism #1's data window) */
static void cfg_wr_sub(u32 bdf, u32 reg, u16 v, int wide)
{
	pci.writes++;
	if (pci.ecam) {
		u64 a = pci.ecam + ((u64)bdf << 12) + reg;
		if (wide)
			wr16(a, v);
		else
			wr8(a, (u8)v);
		return;
	}
	outl(0xcf8, 0x80000000u | bdf << 8 | (reg & ~3u));
	if (wide)
		outw((u16)(0xcfc + (reg & 2)), v);
	else
		outb((u16)(0xcfc + (reg & 3)), (u8)v);
}

static void cfg_wr8(u32 bdf, u32 reg, u8 v) { cfg_wr_sub(bdf, reg, v, 0); }
static void cfg_wr16(u32 bdf, u32 reg, u16 v) { cfg_wr_sub(bdf, reg, v, 1); }

static u32 usb_hc;

static void step(const char *name)
{
	line("usb-step");
	kv_dec("hc", usb_hc);
	kv_str("step", name);
}

static void kv_list(const char *k, u64 base, u32 stride, u32 n)
{
	key(k);
	for (u32 i = 0; i < n; i++) {
		if (i)
			putc_(',');
		put_hex(rd32(base + i * stride));
	}
	if (!n)
		puts_("none");
}

/* PCI status register: Interrupt Status (INTx asserted by the function) */
static u32 intsts(u32 bdf)
{
	return (cfg_rd(bdf, 0x04) >> 19) & 1;
}

/* UHCI 1.1 at I/O BAR 4, as uhci_hcd: uhci_reset_hc, configure_hc, start_rh */
static void uhci_init(struct usbhc *u)
{
	u16 b = (u16)u->addr;
	u32 leg = cfg_rd(u->bdf, 0xc0), n;
	cfg_wr(u->bdf, 0xc0, (leg & 0xffff0000) | 0x8f00);	/* PIRQ, SMI off; R/WC cleared */
	step("legsup");
	kv_hex("found", leg & 0xffff);
	kv_hex("written", 0x8f00);
	kv_hex("now", cfg_rd(u->bdf, 0xc0) & 0xffff);
	eol();

	outw(b, 0x0004);			/* GRESET: held at least 10 ms */
	udelay(11000);
	outw(b, 0);
	step("greset");
	kv_hex("usbcmd", inw(b));
	eol();

	outw(b, 0x0002);			/* HCRESET */
	n = POLL(!(inw(b) & 0x0002), 50);
	step("hcreset");
	kv_dec("polls", n);
	kv_hex("usbcmd", inw(b));
	kv_hex("usbsts", inw(b + 2));
	kv_hex("usbintr", inw(b + 4));
	kv_hex("frnum", inw(b + 6));
	kv_hex("flbase", inl(b + 8));
	kv_hex("sofmod", inb(b + 0x0c));
	eol();
	outw(b + 4, 0);
	outw(b, 0);

	outb(b + 0x0c, 0x40);			/* SOF: 1 ms frames */
	outl(b + 8, (u32)(dma + DMA_FRAMES));
	outw(b + 6, 0);
	cfg_wr(u->bdf, 0xc0, (leg & 0xffff0000) | 0x2000);	/* PIRQ on */
	step("configure");
	kv_hex("list", dma + DMA_FRAMES);
	kv_hex("sofmod", inb(b + 0x0c));
	kv_hex("flbase", inl(b + 8));
	kv_hex("frnum", inw(b + 6));
	kv_hex("legsup", cfg_rd(u->bdf, 0xc0) & 0xffff);
	eol();

	outw(b + 4, 0x000f);			/* timeout/CRC, resume, IOC, short packet */
	outw(b, 0x00c1);			/* RS | CF | MAXP */
	n = POLL(!(inw(b + 2) & 0x0020), 50);
	u32 f0 = inw(b + 6);
	udelay(5000);
	u32 f1 = inw(b + 6);
	step("run");
	kv_dec("polls", n);
	kv_hex("usbcmd", inw(b));
	kv_hex("usbsts", inw(b + 2));
	kv_hex("usbintr", inw(b + 4));
	kv_hex("frnum0", f0);
	kv_hex("frnum1", f1);
	kv_dec("advanced", ((f1 - f0) & 0x7ff) != 0);
	kv_dec("intsts", intsts(u->bdf));
	eol();
	step("ports");
	kv_hex("portsc1", inw(b + 0x10));
	kv_hex("portsc2", inw(b + 0x12));
	kv_hex("portsc3", inw(b + 0x14));	/* not a port: bit 7 clear */
	eol();

	outw(b, 0);
	n = POLL(inw(b + 2) & 0x0020, 50);
	step("stop");
	kv_dec("polls", n);
	kv_hex("usbcmd", inw(b));
	kv_hex("usbsts", inw(b + 2));
	eol();
	outw(b + 4, 0);
}

/* EHCI 1.0 at memory BAR 0: BIOS handoff (pci-quirks), ehci_halt, ehci_reset,
 * CONFIGFLAG, ports, ehci_run, then halted again */
static void ehci_init(struct usbhc *u)
{
	u64 m = u->addr;
	u32 cap = rd32(m), hcs = rd32(m + 4), hcc = rd32(m + 8), n;
	u64 op = m + (cap & 0xff);
	u32 ports = hcs & 0xf, eecp = (hcc >> 8) & 0xff;
	step("caps");
	kv_hex("caplength", cap & 0xff);
	kv_hex("hciversion", cap >> 16);
	kv_hex("hcsparams", hcs);
	kv_hex("hccparams", hcc);
	kv_dec("ports", ports);
	kv_hex("eecp", eecp);
	eol();

	if (eecp >= 0x40) {
		u32 leg = cfg_rd(u->bdf, eecp), ctl = cfg_rd(u->bdf, eecp + 4);
		step("handoff");
		kv_hex("legsup", leg);
		kv_hex("ctlsts", ctl);
		if ((leg & 0xff) == 1) {		/* USB legacy support capability */
			cfg_wr8(u->bdf, eecp + 3, 1);	/* HC OS Owned Semaphore */
			n = POLL(!(cfg_rd(u->bdf, eecp) & (1 << 16)), 1000);
			cfg_wr(u->bdf, eecp + 4, 0);	/* SMIs off, as Linux */
			kv_dec("polls", n);
			kv_hex("legsup_after", cfg_rd(u->bdf, eecp));
			kv_hex("ctlsts_after", cfg_rd(u->bdf, eecp + 4));
		}
		eol();
	}

	wr32(op + 8, 0);
	wr32(op, rd32(op) & ~1u);		/* halt */
	n = POLL(rd32(op + 4) & 0x1000, 50);
	step("halt");
	kv_dec("polls", n);
	kv_hex("usbcmd", rd32(op));
	kv_hex("usbsts", rd32(op + 4));
	eol();

	wr32(op, rd32(op) | 2);			/* HCRESET */
	n = POLL(!(rd32(op) & 2), 250);
	step("hcreset");
	kv_dec("polls", n);
	kv_hex("usbcmd", rd32(op));
	kv_hex("usbsts", rd32(op + 4));
	kv_hex("usbintr", rd32(op + 8));
	kv_hex("frindex", rd32(op + 0x0c));
	kv_hex("configflag", rd32(op + 0x40));
	kv_list("portsc", op + 0x44, 4, ports);
	eol();

	wr32(op + 0x40, 1);			/* CONFIGFLAG: every port to EHCI */
	step("configflag");
	kv_hex("configflag", rd32(op + 0x40));
	kv_list("portsc", op + 0x44, 4, ports);
	eol();

	wr32(op + 8, 0x37);			/* INT, ERR, PCD, HSE, IAA */
	wr32(op, (rd32(op) & 0x00ff0000) | 1);	/* RS, interrupt threshold kept */
	n = POLL(!(rd32(op + 4) & 0x1000), 50);
	step("run");
	kv_dec("polls", n);
	kv_hex("usbcmd", rd32(op));
	kv_hex("usbsts", rd32(op + 4));
	kv_hex("usbintr", rd32(op + 8));
	kv_dec("intsts", intsts(u->bdf));
	eol();

	wr32(op, rd32(op) & ~1u);
	n = POLL(rd32(op + 4) & 0x1000, 50);
	step("stop");
	kv_dec("polls", n);
	kv_hex("usbcmd", rd32(op));
	kv_hex("usbsts", rd32(op + 4));
	eol();
	wr32(op + 8, 0);
}

/* Give one command (already in the ring) to the xHC: ring doorbell 0, wait
 * for its Command Completion Event at event ring slot `ev`, check the
 * interrupt is pending, then acknowledge it as xhci_irq does: USBSTS.EINT,
 * IMAN.IP, ERDP past the event with EHB. */
static void xhci_command(struct usbhc *u, const char *name, u64 op, u64 db, u64 ir, u32 ev)
{
	u64 e = dma + DMA_EVRING + 16 * ev;
	wr32(db, 0);
	u32 n = POLL(rd32(e + 12) & 1, 100);
	udelay(2000);				/* room for interrupt moderation */
	step(name);
	kv_dec("polls", n);
	kv_hex("ptr", rd64(e));
	kv_dec("cc", rd32(e + 8) >> 24);
	kv_dec("slot", rd32(e + 12) >> 24);
	kv_dec("type", (rd32(e + 12) >> 10) & 0x3f);
	kv_dec("cycle", rd32(e + 12) & 1);
	kv_hex("iman", rd32(ir));
	kv_hex("usbsts", rd32(op + 4));
	kv_hex("erdp", rd32(ir + 0x18));
	kv_hex("crcr", rd32(op + 0x18));	/* CRR: the ring runs */
	kv_dec("intsts", intsts(u->bdf));
	eol();

	wr32(op + 4, 0x8);			/* USBSTS.EINT (write 1 to clear) */
	u32 s_eint = rd32(op + 4), i_eint = intsts(u->bdf);
	wr32(ir, 0x3);				/* IMAN.IP (write 1 to clear), IE kept */
	u32 m_ip = rd32(ir), i_ip = intsts(u->bdf);
	wr64lh(ir + 0x18, (e + 16) | 0x8);	/* ERDP past the event, EHB cleared */
	step(name);
	puts_("-ack");
	kv_hex("usbsts", s_eint);
	kv_dec("intsts_eint", i_eint);
	kv_hex("iman", m_ip);
	kv_dec("intsts_ip", i_ip);
	kv_hex("erdp", rd32(ir + 0x18) | (u64)rd32(ir + 0x1c) << 32);
	kv_hex("iman_erdp", rd32(ir));
	kv_hex("usbsts_erdp", rd32(op + 4));
	kv_dec("intsts_erdp", intsts(u->bdf));
	eol();
}

/* xHCI 1.x at 64-bit memory BAR 0, as xhci_hcd: halt, reset, MaxSlotsEn,
 * DCBAAP (+ scratchpads), command ring, event ring, interrupter, run, No-Op
 * and Enable Slot, ports, Supported Protocol capabilities, halt. */
static void xhci_init(struct usbhc *u)
{
	u64 x = u->addr;
	u32 c0 = rd32(x), hcs1 = rd32(x + 4), hcs2 = rd32(x + 8), hcs3 = rd32(x + 0x0c);
	u32 hcc1 = rd32(x + 0x10), dboff = rd32(x + 0x14) & ~3u, rtsoff = rd32(x + 0x18) & ~0x1fu;
	u64 op = x + (c0 & 0xff), db = x + dboff, ir = x + rtsoff + 0x20;
	u32 slots = hcs1 & 0xff, ports = hcs1 >> 24, n, n2;
	u32 nsp = ((hcs2 >> 16) & 0x3e0) | (hcs2 >> 27);
	step("caps");
	kv_hex("caplength", c0 & 0xff);
	kv_hex("hciversion", c0 >> 16);
	kv_hex("hcsparams1", hcs1);
	kv_hex("hcsparams2", hcs2);
	kv_hex("hcsparams3", hcs3);
	kv_hex("hccparams1", hcc1);
	kv_hex("dboff", dboff);
	kv_hex("rtsoff", rtsoff);
	kv_dec("slots", slots);
	kv_dec("intrs", (hcs1 >> 8) & 0x7ff);
	kv_dec("ports", ports);
	kv_dec("scratchpads", nsp);
	kv_dec("erstmax", (hcs2 >> 4) & 0xf);
	eol();

	wr32(op, rd32(op) & ~1u);		/* halt (R/S off) */
	n = POLL(rd32(op + 4) & 1, 50);
	step("halt");
	kv_dec("polls", n);
	kv_hex("usbsts", rd32(op + 4));
	eol();

	wr32(op, rd32(op) | 2);			/* HCRST */
	n = POLL(!(rd32(op) & 2), 1000);
	n2 = POLL(!(rd32(op + 4) & (1 << 11)), 1000);	/* CNR */
	step("hcrst");
	kv_dec("polls", n);
	kv_dec("cnr_polls", n2);
	kv_hex("usbcmd", rd32(op));
	kv_hex("usbsts", rd32(op + 4));
	kv_hex("pagesize", rd32(op + 8));
	kv_hex("config", rd32(op + 0x38));
	kv_hex("dcbaap", rd32(op + 0x30) | (u64)rd32(op + 0x34) << 32);
	eol();

	wr32(op + 0x38, (rd32(op + 0x38) & ~0xffu) | slots);	/* MaxSlotsEn */
	step("config");
	kv_dec("maxslotsen", rd32(op + 0x38) & 0xff);
	eol();

	u64 *dcbaa = (u64 *)(dma + DMA_DCBAA), *spa = (u64 *)(dma + DMA_SPARRAY);
	if (nsp > XHCI_MAX_SCRATCH) {
		error("xhci-scratchpads", "asked", nsp);
		return;
	}
	for (u32 i = 0; i < nsp; i++)
		spa[i] = dma + DMA_SCRATCH + ((u64)i << 12);
	dcbaa[0] = nsp ? dma + DMA_SPARRAY : 0;
	wr64lh(op + 0x30, dma + DMA_DCBAA);
	step("dcbaap");
	kv_hex("written", dma + DMA_DCBAA);
	kv_hex("dcbaap", rd32(op + 0x30) | (u64)rd32(op + 0x34) << 32);
	kv_hex("entry0", dcbaa[0]);
	kv_dec("scratchpads", nsp);
	kv_list("pages", dma + DMA_SPARRAY, 8, nsp);
	eol();

	/* one segment of six TRBs, the last a Link back to the first that toggles
	 * the cycle; the controller starts at TRB 4 (CRCR is 64-byte aligned) */
	u64 ring = dma + DMA_CMDRING;
	wr64lh(op + 0x18, (ring + 64) | 1);	/* CRCR: pointer, RCS = 1 */
	step("cmdring");
	kv_hex("ring", ring + 64);
	kv_hex("crcr", rd32(op + 0x18) | (u64)rd32(op + 0x1c) << 32);
	eol();

	u64 erst = dma + DMA_ERST, evr = dma + DMA_EVRING;
	wr64lh(erst, evr);
	wr32(erst + 8, EV_TRBS);
	wr32(ir + 0x08, 1);			/* ERSTSZ */
	wr64lh(ir + 0x10, erst);		/* ERSTBA */
	wr64lh(ir + 0x18, evr);			/* ERDP */
	step("erst");
	kv_hex("table", erst);
	kv_hex("ring", evr);
	kv_hex("erstsz", rd32(ir + 0x08));
	kv_hex("erstba", rd32(ir + 0x10) | (u64)rd32(ir + 0x14) << 32);
	kv_hex("erdp", rd32(ir + 0x18) | (u64)rd32(ir + 0x1c) << 32);
	eol();

	wr32(ir, 0x2);				/* IMAN.IE */
	wr32(op, rd32(op) | 4);			/* USBCMD.INTE */
	step("interrupter");
	kv_hex("iman", rd32(ir));
	kv_hex("imod", rd32(ir + 4));
	kv_hex("usbcmd", rd32(op));
	eol();

	wr32(op, rd32(op) | 1);			/* R/S */
	n = POLL(!(rd32(op + 4) & 1), 50);
	step("run");
	kv_dec("polls", n);
	kv_hex("usbcmd", rd32(op));
	kv_hex("usbsts", rd32(op + 4));
	kv_hex("crcr", rd32(op + 0x18));
	eol();

	for (u32 i = 0; i < 4; i++)		/* TRBs 0-3: consumed on an earlier pass */
		wr32(ring + 16 * i + 12, 1);
	wr64lh(ring + 64, 0);			/* TRB 4: No-Op command, cycle 1 */
	wr32(ring + 64 + 8, 0);
	wr32(ring + 64 + 12, 23 << 10 | 1);
	wr64lh(ring + 80, ring);		/* TRB 5: Link to TRB 0, toggle cycle */
	wr32(ring + 80 + 8, 0);
	wr32(ring + 80 + 12, 6 << 10 | 2 | 1);
	xhci_command(u, "noop", op, db, ir, 0);
	wr64lh(ring, 0);			/* TRB 0, after the Link: Enable Slot, cycle 0 */
	wr32(ring + 8, 0);
	wr32(ring + 12, 9 << 10);
	xhci_command(u, "enableslot", op, db, ir, 1);

	step("ports");
	kv_list("portsc", op + 0x400, 0x10, ports > 32 ? 32 : ports);
	eol();

	u32 off = (hcc1 >> 16) << 2;
	for (u32 k = 0; off && k < 16; k++) {
		u32 d = rd32(x + off);
		if ((d & 0xff) == 2) {		/* Supported Protocol */
			u32 pi = rd32(x + off + 8);
			step("protocol");
			kv_hex("offset", off);
			kv_dec("major", d >> 24);
			kv_dec("minor", (d >> 16) & 0xff);
			kv_hex("name", rd32(x + off + 4));
			kv_dec("first", pi & 0xff);
			kv_dec("count", (pi >> 8) & 0xff);
			kv_dec("psic", pi >> 28);
			kv_dec("slottype", rd32(x + off + 12) & 0x1f);
			eol();
		} else {
			step("xcap");
			kv_hex("offset", off);
			kv_dec("id", d & 0xff);
			eol();
		}
		if (!((d >> 8) & 0xff))
			break;
		off += ((d >> 8) & 0xff) << 2;
	}

	wr32(op, rd32(op) & ~1u);
	n = POLL(rd32(op + 4) & 1, 50);
	step("stop");
	kv_dec("polls", n);
	kv_hex("usbcmd", rd32(op));
	kv_hex("usbsts", rd32(op + 4));
	kv_hex("crcr", rd32(op + 0x18));
	eol();
	wr32(ir, 0);
	wr32(op, rd32(op) & ~4u);
}

static void report_usb(void)
{
	if (nusb && !dma) {
		dma = ((u64)__memory_end + 0xfff) & ~0xfffUL;
		u64 cnt = DMA_SIZE / 8;
		__asm__ volatile("rep stosq" : "+D"(dma), "+c"(cnt) : "a"(0UL) : "memory");
		dma -= DMA_SIZE;
		u64 fl = dma + DMA_FRAMES;
		cnt = 1024;
		__asm__ volatile("rep stosl" : "+D"(fl), "+c"(cnt) : "a"(1U) : "memory");	/* terminate */
	}
	for (usb_hc = 0; usb_hc < nusb; usb_hc++) {
		struct usbhc *u = &usb[usb_hc];
		u32 pif = u->cls & 0xff;
		const char *kind = pif == 0x00 ? "uhci" : pif == 0x10 ? "ohci" : pif == 0x20 ? "ehci" :
			pif == 0x30 ? "xhci" : "other";
		line("usb");
		kv_dec("hc", usb_hc);
		key("bdf");
		put_hexn(u->bdf >> 8, 2);
		putc_(':');
		put_hexn((u->bdf >> 3) & 31, 2);
		putc_('.');
		putc_((char)('0' + (u->bdf & 7)));
		kv_str("kind", kind);
		kv_dec("bar", u->bar);
		kv_str("space", u->io ? "io" : u->is64 ? "mem64" : "mem32");
		kv_hex("base", u->addr);
		kv_hex("size", u->size);
		eol();
		if (!u->size || !u->addr || (!u->io && !mapped(u->addr, u->size)) ||
		    (u->io != (pif == 0x00)) || (pif != 0x00 && pif != 0x20 && pif != 0x30)) {
			error("usb-skipped", "bdf", u->bdf);
			continue;
		}
		u32 cmd = cfg_rd(u->bdf, 0x04) & 0xffff;
		cfg_wr(u->bdf, 0x04, cmd | (u->io ? 1 : 2) | 4);	/* decode, bus master */
		step("enable");
		kv_hex("cmd", cmd);
		kv_hex("now", cfg_rd(u->bdf, 0x04) & 0xffff);
		eol();
		if (pif == 0x00)
			uhci_init(u);
		else if (pif == 0x20)
			ehci_init(u);
		else
			xhci_init(u);
	}
	line("usb-end");
	kv_dec("controllers", nusb);
	eol();
}

/* ---- BAR moves (pyhv.barmove) -------------------------------------------- */

/*
 * The first USB controller's interface BAR (and, when the controllers have
 * both kinds, the first I/O BAR and the first memory BAR) moves to free room
 * in the same bridge window (bus 0: I/O 0xc000-0xffff, memory
 * 0xc0000000-0xfebfffff outside ECAM) with its decoding off, and back.  A
 * register that identifies the controller is read at the new place and the
 * old one (which must float: all ones), and again after the move back.
 */
static int ancestor(int b, int of)
{
	for (int i = 0; of >= 0 && i < MAX_BRIDGES; i++, of = bridges[of].parent)
		if (of == b)
			return 1;
	return 0;
}

static u64 room_lo, room_hi;	/* [lo, hi) */

static int room_ok(struct usbhc *u, u64 c)
{
	if (c == u->addr || c & (u->size - 1) || c < room_lo || c + u->size > room_hi)
		return 0;
	for (u32 i = 0; i < nranges; i++)
		if (ranges[i].io == u->io && c < ranges[i].end && ranges[i].base < c + u->size &&
		    (ranges[i].bridge < 0 || !ancestor(ranges[i].bridge, u->parent)))
			return 0;
	if (!u->io && pci.ecam && c < pci.ecam + ((u64)(pci.last_bus + 1) << 20) &&
	    pci.ecam < c + u->size)
		return 0;
	return 1;
}

static u64 free_room(struct usbhc *u)
{
	int k = u->io ? 0 : u->pref ? 2 : 1;
	if (u->parent < 0) {
		room_lo = u->io ? 0xc000 : 0xc0000000;
		room_hi = u->io ? 0x10000 : 0xfec00000;
	} else {
		if (k == 2 && bridges[u->parent].win[2][0] > bridges[u->parent].win[2][1])
			k = 1;			/* no prefetchable window: the memory one */
		room_lo = bridges[u->parent].win[k][0];
		room_hi = bridges[u->parent].win[k][1] + 1;
	}
	u64 s = u->size;
	if (room_ok(u, u->addr + s))
		return u->addr + s;
	if (u->addr >= s && room_ok(u, u->addr - s))
		return u->addr - s;
	for (u32 i = 0; i < nranges; i++) {
		u64 up = (ranges[i].end + s - 1) & ~(s - 1);
		if (room_ok(u, up))
			return up;
		if (ranges[i].base >= s && room_ok(u, (ranges[i].base - s) & ~(s - 1)))
			return (ranges[i].base - s) & ~(s - 1);
	}
	if (room_ok(u, room_lo))
		return room_lo;
	return 0;
}

/* what identifies the controller: UHCI PORTSC1|PORTSC2 << 16 (bit 7 reads 1),
 * EHCI and xHCI CAPLENGTH|HCIVERSION << 16 */
static u32 bar_sig(struct usbhc *u, u64 a)
{
	return u->io ? inl((u16)(a + 0x10)) : rd32(a);
}

static void bar_program(struct usbhc *u, u64 a)
{
	u32 reg = 0x10 + 4 * u->bar, dec = u->io ? 1 : 2;
	u32 cmd = cfg_rd(u->bdf, 0x04) & 0xffff;
	cfg_wr(u->bdf, 0x04, cmd & ~dec);
	cfg_wr(u->bdf, reg, (u32)a | u->flags);
	if (u->is64)
		cfg_wr(u->bdf, reg + 4, (u32)(a >> 32));
	cfg_wr(u->bdf, 0x04, cmd);
}

static u64 bar_reg(struct usbhc *u)
{
	u32 reg = 0x10 + 4 * u->bar;
	return cfg_rd(u->bdf, reg) | (u->is64 ? (u64)cfg_rd(u->bdf, reg + 4) << 32 : 0);
}

static void bar_move(struct usbhc *u)
{
	u64 from = u->addr, to = free_room(u);
	line("barmove");
	key("bdf");
	put_hexn(u->bdf >> 8, 2);
	putc_(':');
	put_hexn((u->bdf >> 3) & 31, 2);
	putc_('.');
	putc_((char)('0' + (u->bdf & 7)));
	kv_dec("bar", u->bar);
	kv_str("space", u->io ? "io" : u->is64 ? "mem64" : "mem32");
	kv_hex("size", u->size);
	kv_str("room", u->parent < 0 ? "root" : "window");
	kv_hex("room_lo", room_lo);
	kv_hex("room_hi", room_hi);
	kv_hex("from", from);
	if (!to || (!u->io && !mapped(to, u->size))) {
		kv_str("to", "none");
		eol();
		return;
	}
	kv_hex("to", to);
	kv_hex("sig", bar_sig(u, from));
	bar_program(u, to);
	kv_hex("reg_moved", bar_reg(u));
	kv_hex("at_new", bar_sig(u, to));
	kv_hex("at_old", bar_sig(u, from));
	bar_program(u, from);
	kv_hex("reg_back", bar_reg(u));
	kv_hex("at_orig", bar_sig(u, from));
	kv_hex("at_new_after", bar_sig(u, to));
	eol();
}

static void report_barmove(void)
{
	int io = -1, mem = -1;
	for (u32 i = 0; i < nusb; i++) {
		if (!usb[i].size || !usb[i].addr)
			continue;
		if (usb[i].io && io < 0)
			io = (int)i;
		if (!usb[i].io && mem < 0)
			mem = (int)i;
	}
	if (io >= 0 && (mem < 0 || io < mem)) {
		bar_move(&usb[io]);
		if (mem >= 0)
			bar_move(&usb[mem]);
	} else if (mem >= 0) {
		bar_move(&usb[mem]);
		if (io >= 0)
			bar_move(&usb[io]);
	}
	line("barmove-end");
	kv_dec("moves", (io >= 0) + (mem >= 0));
	eol();
}

/* ---- power off, reset --------------------------------------------------- */

static void __attribute__((noreturn)) poweroff(void)
{
	in_poweroff = 1;
	if (acpi.sleep_ctl && ((acpi.fadt_flags & (1 << 20)) || !acpi.pm1a_cnt)) {
		line("poweroff");
		kv_str("method", "sleep-control");
		kv_dec("slp_typ", acpi.slp_typ);
		eol();
		u8 v = (u8)(((acpi.slp_typ & 7) << 2) | (1 << 5));
		if (acpi.sleep_space == 1)
			outb((u16)acpi.sleep_ctl, v);
		else if (mapped(acpi.sleep_ctl, 1))
			wr8(acpi.sleep_ctl, v);
		delay(2000000000UL, 200000);
	}
	if (acpi.pm1a_cnt) {
		line("poweroff");
		kv_str("method", "pm1a");
		kv_dec("slp_typ", acpi.slp_typ);
		eol();
		outw((u16)acpi.pm1a_cnt, (u16)(((acpi.slp_typ & 7) << 10) | (1 << 13)));
		delay(2000000000UL, 200000);
	}
	line("poweroff");
	kv_str("method", "debug-exit");
	eol();
	outb(DEBUG_EXIT_PORT, DEBUG_EXIT_VALUE);
	delay(1000000000UL, 100000);
	line("poweroff-failed");
	eol();
	halt_forever();
}

static void __attribute__((noreturn)) reset(void)
{
	line("reset");
	kv_str("method", "i8042");
	eol();
	outb(0x64, 0xfe);
	delay(2000000000UL, 200000);
	line("reset-failed");
	eol();
	poweroff();
}

/* ---- interrupts ---------------------------------------------------------- */

struct idt_entry {
	u16 off_lo, sel;
	u8 ist, attr;
	u16 off_mid;
	u32 off_hi, zero;
};

static struct idt_entry idt[256] __attribute__((aligned(16)));
extern const u64 exc_stub_table[32];
extern void irq_stub(void), spurious_stub(void);

static void set_gate(int v, u64 h)
{
	idt[v].off_lo = (u16)h;
	idt[v].sel = 0x18;
	idt[v].ist = 0;
	idt[v].attr = 0x8e;
	idt[v].off_mid = (u16)(h >> 16);
	idt[v].off_hi = (u32)(h >> 32);
	idt[v].zero = 0;
}

static void idt_init(void)
{
	struct __attribute__((packed)) { u16 limit; u64 base; } d;
	for (int i = 0; i < 32; i++)
		set_gate(i, exc_stub_table[i]);
	set_gate(SCI_VECTOR, (u64)irq_stub);
	set_gate(0xff, (u64)spurious_stub);
	d.limit = sizeof(idt) - 1;
	d.base = (u64)idt;
	__asm__ volatile("lidt %0" : : "m"(d));
}

struct exc_frame { u64 vector, error, rip, cs, rflags, rsp, ss; };

void guest_exception(struct exc_frame *f)
{
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	line("exception");
	kv_dec("vector", f->vector);
	kv_hex("error", f->error);
	kv_hex("rip", f->rip);
	kv_hex("rsp", f->rsp);
	kv_hex("cr2", cr2);
	eol();
	if (!in_poweroff)
		poweroff();
	halt_forever();
}

static volatile int pwrbtn_pressed;

void guest_irq(void)
{
	u16 sts = inw((u16)acpi.pm1a_evt);
	if (sts & 0x100) {
		outw((u16)acpi.pm1a_evt, 0x100);
		pwrbtn_pressed = 1;
	}
	lapic_write(0xb0, 0);
}

static void ioapic_write(u32 reg, u32 v)
{
	wr32(acpi.ioapic, reg);
	wr32(acpi.ioapic + 0x10, v);
}

static void wait_powerbutton(void)
{
	if ((acpi.fadt_flags & (1 << 20)) || !acpi.pm1a_evt || !acpi.have_ioapic) {
		error("powerbutton-unsupported", "fadt_flags", acpi.fadt_flags);
		return;
	}
	lapic_setup();
	u16 evt = (u16)acpi.pm1a_evt;
	u16 en = (u16)(evt + (acpi.pm1_evt_len ? acpi.pm1_evt_len / 2 : 2));
	/* ACPI mode: SCI_EN set by SMI_CMD/ACPI_ENABLE when firmware left it off */
	if (acpi.pm1a_cnt && acpi.smi_cmd && acpi.acpi_enable && !(inw((u16)acpi.pm1a_cnt) & 1)) {
		outb((u16)acpi.smi_cmd, acpi.acpi_enable);
		for (int i = 0; i < 1000 && !(inw((u16)acpi.pm1a_cnt) & 1); i++)
			pause();
	}
	if (acpi.madt_flags & 1) {	/* PCAT_COMPAT: mask the 8259s */
		outb(0x21, 0xff);
		outb(0xa1, 0xff);
	}
	/* polarity: flags bits 0-1 (3 = active low); trigger: bits 2-3 (1 = edge) */
	int low = (acpi.sci_flags & 3) == 3;
	int edge = ((acpi.sci_flags >> 2) & 3) == 1;
	u32 pin = acpi.sci_gsi - acpi.ioapic_gsi_base;
	u32 bsp = lapic_id();
	lapic_write(0x80, 0);		/* TPR */
	lapic_write(0xf0, 0x1ff);	/* SVR: enable, spurious vector 0xff */
	ioapic_write(0x11 + 2 * pin, bsp << 24);
	ioapic_write(0x10 + 2 * pin, SCI_VECTOR | (edge ? 0 : 1 << 15) | (low ? 1 << 13 : 0));
	outw(evt, 0x100);		/* clear PWRBTN_STS */
	outw(en, 0x100);		/* PWRBTN_EN */
	line("waiting");
	kv_str("event", "powerbutton");
	kv_dec("gsi", acpi.sci_gsi);
	kv_str("trigger", edge ? "edge" : "level");
	kv_str("polarity", low ? "low" : "high");
	eol();
	for (;;) {
		__asm__ volatile("cli" ::: "memory");
		if (pwrbtn_pressed)
			break;
		__asm__ volatile("sti; hlt" ::: "memory");
	}
	line("powerbutton");
	eol();
}

/* ---- virtio-pci (pyhv.virtio, pyhv.virtio-console, pyhv.virtio-net) ------ */

/*
 * A small modern (virtio 1.x) virtio-pci driver, run on each virtio-rng
 * (1af4:1044) and virtio-blk (1af4:1042) the walk found with pyhv.virtio, and
 * on each virtio-console (1af4:1043) with pyhv.virtio-console and each
 * virtio-net (1af4:1041) with pyhv.virtio-net (=msix or =intx each; other
 * modern virtio functions are listed with a "skipped" step; virtio-blk gets the
 * requests of vblk_requests instead of the rng's, virtio-console the
 * conversation of vcon_run on queues 0-5 instead of queue 0, virtio-net the
 * frames of vnet_run on queues 0-2): vendor
 * capabilities parsed, the status dance, features,
 * queue 0 with a few writable buffers (virtio-rng fills them), the used ring
 * and the interrupt, then a driver that breaks the protocol (the available
 * index runs ahead by more than the queue size) and must see NEEDS_RESET,
 * then a reset and one more good request.  Every step is one
 * "@virtio-step dev=N step=NAME ..." line of registers as read back.
 *
 * Interrupts: with MSI-X (pyhv.virtio=msix or plain pyhv.virtio) entry 0
 * sends VIRTIO_VECTOR (queue 0) and entry 1 VIRTIO_CFG_VECTOR (configuration
 * changes) to the BSP; with INTx (pyhv.virtio=intx) the IOAPIC pin named by
 * the interrupt line register sends VIRTIO_VECTOR (level) and the handler
 * reads the ISR.  Interrupts are taken for real (IDT gates, sti) but only
 * inside bounded waits; everything else runs with IF clear (virtio-console and
 * virtio-net: all their queues on entry 0, and IF set from DRIVER_OK until the
 * reset).
 */
#define VIRTIO_VECTOR	  0x50
#define VIRTIO_CFG_VECTOR 0x51
#define VQ_WANT		8		/* queue size asked for (at most the device's) */
#define VPOLL_FAIL	200000u		/* rounds of a poll whose condition never held */

#define VS_ACK		0x01
#define VS_DRIVER	0x02
#define VS_DRIVER_OK	0x04
#define VS_FEATURES_OK	0x08
#define VS_NEEDS_RESET	0x40

#define VF_EVENT_IDX	(1u << 29)	/* low half */
/* virtio-blk feature bits (low half) */
#define VBF_RO		(1u << 5)
#define VBF_BLK_SIZE	(1u << 6)
#define VBF_FLUSH	(1u << 9)
#define VBF_DISCARD	(1u << 13)
#define VBF_WRITE_ZEROES (1u << 14)
#define VBF_WANT	(VF_EVENT_IDX | VBF_RO | VBF_BLK_SIZE | VBF_FLUSH | VBF_DISCARD | \
			 VBF_WRITE_ZEROES)
#define VF_VERSION_1	(1u << 0)	/* high half: bit 32 */
/* virtio-console feature bits (low half) */
#define VCF_MULTIPORT	(1u << 1)

/* struct virtio_pci_common_cfg */
#define VC_DFSELECT	0x00
#define VC_DF		0x04
#define VC_GFSELECT	0x08
#define VC_GF		0x0c
#define VC_MSIX		0x10
#define VC_NUMQ		0x12
#define VC_STATUS	0x14
#define VC_GEN		0x15
#define VC_QSELECT	0x16
#define VC_QSIZE	0x18
#define VC_QMSIX	0x1a
#define VC_QENABLE	0x1c
#define VC_QNOFF	0x1e
#define VC_QDESC	0x20
#define VC_QDRIVER	0x28
#define VC_QDEVICE	0x30

/* a queue's ring page: descriptor table, available ring, used ring, buffers */
#define VQ_DESC		0x000
#define VQ_AVAIL	0x100
#define VQ_USED		0x200
#define VQ_BUFS		0x400
#define VQ_MEM		0x1000
#define VQ_MAX		6		/* queues set up at most (virtio-console: 0-5) */

/* One virtqueue as the driver keeps it: queue `index` of the device, its ring
 * page, the size in use, queue_notify_off, the next available index and the
 * used elements consumed so far.  rng and blk use vqs[0] only. */
struct vq {
	u8 *mem;
	u32 index, size, qnoff;
	u16 avail_idx, used_seen;
};

static u8 vq_pages[VQ_MAX][VQ_MEM] __attribute__((aligned(4096)));
static struct vq vqs[VQ_MAX];
/* page tables for BARs above the identity map (2 MiB pages, uncached) */
static u64 hi_pdpt[512] __attribute__((aligned(4096)));
static u64 hi_pd[512] __attribute__((aligned(4096)));
static u64 hi_pdpt_slot, hi_pd_slot;	/* which PML4 / PDPT index (+1) they serve */

static struct {
	int msix;		/* 1: MSI-X, 0: INTx */
	u32 dev, bdf;
	u32 want_lo;		/* low feature bits the driver takes when offered */
	u32 accepted_lo;
	u64 common, isr, device, notify;
	u32 mult;		/* notify_off_multiplier */
	u32 pcicfg;		/* configuration offset of the PCI-cfg capability */
	u32 common_bar, common_off;	/* where the common structure lies */
	u32 msix_cap, msix_size, msix_table_reg, msix_pba_reg;
	u64 msix_table;
	u32 cfg_entry;		/* MSI-X entry for configuration changes */
	u32 line, ioapic_pin;	/* INTx: IOAPIC pin (0xff: none) */
	/* interrupts taken: on VIRTIO_VECTOR, on VIRTIO_CFG_VECTOR, and (INTx)
	 * those whose ISR read found a cause; ISR values read */
	volatile u32 irqs, cfg_irqs, hits, isr_last, isr_all, isr_late;
} vio;

static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" : : "r"(v) : "memory"); }

/* Make [addr, addr+len) reachable: below 4 GiB it is (entry.S); above, one more
 * page directory (and PDPT above 512 GiB) of 2 MiB uncached pages.  0: it
 * needs more tables than that. */
static int map_high(u64 addr, u64 len)
{
	if (mapped(addr, len))
		return 1;
	if (!len || addr + len < addr || (addr + len - 1) >> 47)
		return 0;
	u64 cr3 = read_cr3(), *pml4 = (u64 *)(cr3 & 0xffffffffff000UL);
	for (u64 va = addr & ~0x1fffffUL; va < addr + len; va += 0x200000) {
		u64 i4 = va >> 39, i3 = va >> 30;
		u64 *e4 = &pml4[i4 & 511];
		if (!(*e4 & 1)) {
			if (hi_pdpt_slot && hi_pdpt_slot != i4 + 1)
				return 0;
			hi_pdpt_slot = i4 + 1;
			*e4 = (u64)hi_pdpt | 3;
		}
		u64 *pdpt = (u64 *)(*e4 & 0xffffffffff000UL);
		u64 *e3 = &pdpt[i3 & 511];
		if (!(*e3 & 1)) {
			if (hi_pd_slot && hi_pd_slot != i3 + 1)
				return 0;
			hi_pd_slot = i3 + 1;
			*e3 = (u64)hi_pd | 3;
		} else if ((*e3 & 0xffffffffff000UL) != (u64)hi_pd) {
			return 0;
		}
		hi_pd[(va >> 21) & 511] = va | 0x9b;	/* P RW PWT PCD PS */
	}
	write_cr3(cr3);
	return 1;
}

static u32 ioapic_read(u32 reg)
{
	wr32(acpi.ioapic, reg);
	return rd32(acpi.ioapic + 0x10);
}

/* the local APIC's IRR (pending) and ISR (in service) bit of a vector */
static u32 lapic_irr(u32 v) { return (lapic_read(0x200 + 0x10 * (v >> 5)) >> (v & 31)) & 1; }
static u32 lapic_isr(u32 v) { return (lapic_read(0x100 + 0x10 * (v >> 5)) >> (v & 31)) & 1; }

struct interrupt_frame;

__attribute__((interrupt)) static void virtio_queue_irq(struct interrupt_frame *f)
{
	(void)f;
	if (!vio.msix) {
		u32 v = rd8(vio.isr);	/* reading acknowledges: the device drops INTx */
		if (v) {
			vio.isr_last = v;
			vio.hits++;
		}
		vio.isr_all |= v;
		vio.isr_late |= v;
	}
	vio.irqs++;
	lapic_write(0xb0, 0);
}

__attribute__((interrupt)) static void virtio_config_irq(struct interrupt_frame *f)
{
	(void)f;
	vio.cfg_irqs++;
	lapic_write(0xb0, 0);
}

/* Poll until `done` holds, at most `ms` milliseconds (PM timer) and VPOLL_FAIL
 * rounds; the value is the rounds it took, VPOLL_FAIL when it never held. */
#define VPOLL(done, ms) ({							\
	u32 _n = 0, _t0 = pm_ticks();						\
	while (!(done) && _n < VPOLL_FAIL &&					\
	       ((pm_ticks() - _t0) & 0xffffff) < (u32)(ms) * 3580)		\
		_n++;								\
	(done) ? _n : VPOLL_FAIL; })

/* Let interrupts in until `done` holds (bounded as VPOLL), then IF off again. */
#define VWAIT_IRQ(done, ms) ({							\
	__asm__ volatile("sti" ::: "memory");					\
	u32 _r = VPOLL(done, ms);						\
	__asm__ volatile("cli" ::: "memory");					\
	_r; })

static u8 vc8(u32 o) { return rd8(vio.common + o); }
static u16 vc16(u32 o) { return rd16(vio.common + o); }
static u32 vc32(u32 o) { return rd32(vio.common + o); }
static u64 vc64(u32 o) { return vc32(o) | (u64)vc32(o + 4) << 32; }
static void vw8(u32 o, u8 v) { wr8(vio.common + o, v); }
static void vw16(u32 o, u16 v) { wr16(vio.common + o, v); }
static void vw32(u32 o, u32 v) { wr32(vio.common + o, v); }
static void vw64(u32 o, u64 v) { vw32(o, (u32)v); vw32(o + 4, (u32)(v >> 32)); }

static void vstep(const char *name)
{
	line("virtio-step");
	kv_dec("dev", vio.dev);
	kv_str("step", name);
}

static void put_bdf(u32 bdf)
{
	put_hexn(bdf >> 8, 2);
	putc_(':');
	put_hexn((bdf >> 3) & 31, 2);
	putc_('.');
	putc_((char)('0' + (bdf & 7)));
}

/* reset: 0 written, read back until 0 (the device may take its time) */
static void virtio_reset(const char *name)
{
	vw8(VC_STATUS, 0);
	u32 n = VPOLL(vc8(VC_STATUS) == 0, 1000);
	vw16(VC_QSELECT, 0);
	vstep(name);
	kv_dec("polls", n);
	kv_hex("status", vc8(VC_STATUS));
	kv_hex("config_vector", vc16(VC_MSIX));
	kv_hex("queue_vector", vc16(VC_QMSIX));
	kv_hex("queue_size", vc16(VC_QSIZE));
	kv_hex("queue_enable", vc16(VC_QENABLE));
	kv_hex("queue_desc", vc64(VC_QDESC));
	kv_hex("queue_driver", vc64(VC_QDRIVER));
	kv_hex("queue_device", vc64(VC_QDEVICE));
	eol();
}

/* ACKNOWLEDGE, DRIVER, features (VERSION_1, RING_EVENT_IDX when offered),
 * FEATURES_OK; quiet: only the last status is returned */
static u32 virtio_negotiate(int quiet)
{
	vw8(VC_STATUS, VS_ACK);
	u32 s1 = vc8(VC_STATUS);
	vw8(VC_STATUS, VS_ACK | VS_DRIVER);
	u32 s2 = vc8(VC_STATUS);
	vw32(VC_DFSELECT, 0);
	u32 lo = vc32(VC_DF);
	vw32(VC_DFSELECT, 1);
	u32 hi = vc32(VC_DF);
	u32 want_lo = lo & vio.want_lo, want_hi = hi & VF_VERSION_1;
	vio.accepted_lo = want_lo;
	vw32(VC_GFSELECT, 0);
	vw32(VC_GF, want_lo);
	vw32(VC_GFSELECT, 1);
	vw32(VC_GF, want_hi);
	vw32(VC_GFSELECT, 0);
	u32 glo = vc32(VC_GF);
	vw32(VC_GFSELECT, 1);
	u32 ghi = vc32(VC_GF);
	vw8(VC_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK);
	u32 s3 = vc8(VC_STATUS);
	if (quiet)
		return s3;
	vstep("acknowledge");
	kv_hex("status", s1);
	eol();
	vstep("driver");
	kv_hex("status", s2);
	eol();
	vstep("features");
	kv_hex("device_lo", lo);
	kv_hex("device_hi", hi);
	kv_hex("accepted_lo", want_lo);
	kv_hex("accepted_hi", want_hi);
	kv_hex("driver_lo", glo);
	kv_hex("driver_hi", ghi);
	kv_dec("event_idx", !!(want_lo & VF_EVENT_IDX));
	eol();
	vstep("features-ok");
	kv_hex("status", s3);
	eol();
	return s3;
}

/* the MSI-X capability's message control (upper half of its first dword) */
static void msix_control(u32 ctrl)
{
	u32 c = cfg_rd(vio.bdf, vio.msix_cap);
	cfg_wr(vio.bdf, vio.msix_cap, (c & 0xffff) | ctrl << 16);
}

/* MSI-X: entry 0 -> VIRTIO_VECTOR, entry `cfg_entry` -> VIRTIO_CFG_VECTOR, both
 * fixed delivery to the BSP; enabled with the function masked, unmasked last.
 * INTx: MSI-X left off, the IOAPIC pin = the line register routed (level). */
static void virtio_interrupts(void)
{
	u32 bsp = lapic_id();
	if (vio.msix) {
		u64 t = vio.msix_table;
		msix_control(0xc000);			/* enable + function mask */
		for (u32 e = 0; e < 2 && e < vio.msix_size; e++) {
			u64 te = t + 16 * (e ? vio.cfg_entry : 0);
			wr32(te, 0xfee00000u | (bsp & 0xff) << 12);
			wr32(te + 4, 0);
			wr32(te + 8, e ? VIRTIO_CFG_VECTOR : VIRTIO_VECTOR);
			wr32(te + 12, 0);		/* unmasked */
		}
		msix_control(0x8000);			/* function mask off */
		vw16(VC_MSIX, (u16)vio.cfg_entry);
		vstep("msix");
		kv_hex("control", cfg_rd(vio.bdf, vio.msix_cap) >> 16);
		kv_hex("entry0_addr", rd32(t));
		kv_hex("entry0_data", rd32(t + 8));
		kv_hex("entry0_ctrl", rd32(t + 12));
		kv_dec("config_entry", vio.cfg_entry);
		kv_hex("config_addr", rd32(t + 16 * vio.cfg_entry));
		kv_hex("config_data", rd32(t + 16 * vio.cfg_entry + 8));
		kv_hex("config_vector", vc16(VC_MSIX));
		kv_dec("apic_id", bsp);
		eol();
		return;
	}
	u32 irq = cfg_rd(vio.bdf, 0x3c);
	vio.line = irq & 0xff;
	vio.ioapic_pin = 0xff;
	if (acpi.have_ioapic && vio.line < 0xff) {
		u32 max = (ioapic_read(0x01) >> 16) & 0xff;
		u32 pin = vio.line - acpi.ioapic_gsi_base;
		if (vio.line >= acpi.ioapic_gsi_base && pin <= max) {
			vio.ioapic_pin = pin;
			ioapic_write(0x11 + 2 * pin, bsp << 24);
			ioapic_write(0x10 + 2 * pin, VIRTIO_VECTOR | 1 << 15);	/* level, high */
		}
	}
	vstep("intx");
	kv_dec("pin", (irq >> 8) & 0xff);
	kv_dec("line", vio.line);
	kv_hex("msix_control", vio.msix_cap ? cfg_rd(vio.bdf, vio.msix_cap) >> 16 : 0);
	kv_hex("config_vector", vc16(VC_MSIX));
	if (vio.ioapic_pin != 0xff) {
		kv_dec("ioapic_pin", vio.ioapic_pin);
		kv_hex("redir", ioapic_read(0x10 + 2 * vio.ioapic_pin));
	} else {
		kv_str("ioapic_pin", "none");
	}
	kv_dec("intsts", intsts(vio.bdf));
	eol();
}

/* Queue `index` (selected, left selected) into `q` on ring page `index`: size
 * min(max, VQ_WANT), the three addresses, MSI-X vector 0; the page is zeroed
 * first when `clear`.  Returns the device's maximum size. */
static u32 vq_setup(struct vq *q, u32 index, int clear)
{
	q->mem = vq_pages[index];
	q->index = index;
	u64 m = (u64)q->mem;
	if (clear)
		memset(q->mem, 0, VQ_MEM);
	q->avail_idx = q->used_seen = 0;
	vw16(VC_QSELECT, (u16)index);
	u32 max = vc16(VC_QSIZE);
	q->size = max < VQ_WANT ? max : VQ_WANT;
	vw16(VC_QSIZE, (u16)q->size);
	if (vio.msix)
		vw16(VC_QMSIX, 0);
	vw64(VC_QDESC, m + VQ_DESC);
	vw64(VC_QDRIVER, m + VQ_AVAIL);
	vw64(VC_QDEVICE, m + VQ_USED);
	q->qnoff = vc16(VC_QNOFF);
	return max;
}

/* the selected queue's registers after vq_setup (a `queue` step's fields) */
static void vq_report(struct vq *q, u32 max, u32 vector_before)
{
	kv_dec("num_queues", vc16(VC_NUMQ));
	kv_dec("max_size", max);
	kv_dec("size", vc16(VC_QSIZE));
	kv_hex("vector_before", vector_before);
	kv_hex("vector", vc16(VC_QMSIX));
	kv_hex("ring", (u64)q->mem);
	kv_hex("desc", vc64(VC_QDESC));
	kv_hex("driver", vc64(VC_QDRIVER));
	kv_hex("device", vc64(VC_QDEVICE));
	kv_dec("notify_off", q->qnoff);
	kv_hex("enable", vc16(VC_QENABLE));
}

/* queue 0 (rng, blk) on a zeroed page; quiet: no line */
static void virtio_queue(int quiet)
{
	vw16(VC_QSELECT, 0);
	u32 qv_before = vc16(VC_QMSIX);
	u32 max = vq_setup(&vqs[0], 0, 1);
	if (quiet)
		return;
	vstep("queue");
	vq_report(&vqs[0], max, qv_before);
	eol();
}

/* descriptor `i` of q: `len` bytes at `buf`, flags (1 NEXT, 2 WRITE), next */
static void vq_desc(struct vq *q, u32 i, u64 buf, u32 len, u16 flags, u16 next)
{
	u64 d = (u64)q->mem + VQ_DESC + 16 * i;
	wr32(d, (u32)buf);
	wr32(d + 4, (u32)(buf >> 32));
	wr32(d + 8, len);
	wr16(d + 12, flags);
	wr16(d + 14, next);
}

/* one buffer as its own chain (`flags` 2: device-writable, 0: device-readable),
 * on the available ring (not yet published) */
static void vq_add(struct vq *q, u32 desc, u64 buf, u32 len, u16 flags)
{
	vq_desc(q, desc, buf, len, flags, 0);
	wr16((u64)q->mem + VQ_AVAIL + 4 + 2 * (q->avail_idx % q->size), (u16)desc);
	q->avail_idx++;
}

static void vq_publish_and_notify(struct vq *q, u16 idx)
{
	wr16((u64)q->mem + VQ_AVAIL + 2, idx);
	__asm__ volatile("mfence" ::: "memory");
	wr16(vio.notify + q->qnoff * vio.mult, (u16)q->index);	/* the queue's index */
}

static u32 used_idx(struct vq *q) { return rd16((u64)q->mem + VQ_USED + 2); }
/* the used element at used index `i`: id, len */
static u32 used_id(struct vq *q, u32 i) { return rd32((u64)q->mem + VQ_USED + 4 + 8 * (i % q->size)); }
static u32 used_len(struct vq *q, u32 i) { return rd32((u64)q->mem + VQ_USED + 8 + 8 * (i % q->size)); }

/* After the device used buffers or broke (IF clear): the interrupt as it is
 * pending (local APIC IRR, PCI status, IOAPIC Remote IRR), then taken
 * (`count`: interrupts on `counter` since `before`; with INTx those whose
 * ISR read found a cause, `spurious` the others), the state after the
 * handler's EOI, and what still arrives in the next 5 ms. */
static void virtio_take_irq(u32 vector, volatile u32 *counter, u32 before)
{
	u32 irqs0 = vio.irqs, hits0 = vio.hits;
	u32 n = VPOLL(lapic_irr(vector), 1000);
	kv_dec("irr_polls", n);
	kv_dec("irr", lapic_irr(vector));
	kv_dec("intsts", intsts(vio.bdf));
	if (!vio.msix && vio.ioapic_pin != 0xff)
		kv_dec("remote_irr", (ioapic_read(0x10 + 2 * vio.ioapic_pin) >> 14) & 1);
	vio.isr_last = 0;
	n = VWAIT_IRQ(*counter != before, 1000);
	kv_dec("irq_polls", n);
	kv_dec("count", *counter - before);
	if (!vio.msix) {
		kv_hex("handler_isr", vio.isr_last);
		kv_dec("spurious", (vio.irqs - irqs0) - (vio.hits - hits0));
	}
	kv_dec("irr_after", lapic_irr(vector));
	kv_dec("inservice_after", lapic_isr(vector));
	kv_dec("intsts_after", intsts(vio.bdf));
	if (!vio.msix && vio.ioapic_pin != 0xff)
		kv_dec("remote_irr_after", (ioapic_read(0x10 + 2 * vio.ioapic_pin) >> 14) & 1);
	/* what still arrives in the next 5 ms (the device has nothing more to
	 * say): counted, with the ISR the handler read (INTx) */
	u32 all = vio.irqs + vio.cfg_irqs;
	vio.isr_late = 0;
	__asm__ volatile("sti" ::: "memory");
	udelay(5000);
	__asm__ volatile("cli" ::: "memory");
	kv_dec("late", vio.irqs + vio.cfg_irqs - all);
	if (!vio.msix)
		kv_hex("late_isr", vio.isr_late);
}

/* The good requests: buffers of the given lengths, one chain each. */
static void virtio_requests(const char *name, const u32 *lens, u32 n)
{
	struct vq *q = &vqs[0];
	u64 bufs = (u64)q->mem + VQ_BUFS, b = bufs;
	u32 first = q->avail_idx, before = vio.msix ? vio.irqs : vio.hits;
	for (u32 i = 0; i < n; i++) {
		vq_add(q, i, b, lens[i], 2);	/* VIRTQ_DESC_F_WRITE */
		b += lens[i];
	}
	vq_publish_and_notify(q, q->avail_idx);
	u32 want = (first + n) & 0xffff;
	u32 polls = VPOLL(used_idx(q) == want, 2000);
	vstep(name);
	kv_dec("polls", polls);
	kv_dec("avail_idx", q->avail_idx);
	kv_dec("used_idx", used_idx(q));
	kv_hex("used_flags", rd16((u64)q->mem + VQ_USED));
	kv_dec("avail_event", rd16((u64)q->mem + VQ_USED + 4 + 8 * q->size));
	key("ids");
	for (u32 i = 0; i < n; i++) {
		if (i)
			putc_(',');
		put_dec(used_id(q, first + i));
	}
	key("lens");
	for (u32 i = 0; i < n; i++) {
		if (i)
			putc_(',');
		put_dec(used_len(q, first + i));
	}
	/* what the device wrote: buffers all zero, buffers of one repeated byte,
	 * pairs of buffers whose first 16 bytes are equal */
	u32 zero = 0, flat = 0, same = 0;
	b = bufs;
	for (u32 i = 0; i < n; i++) {
		const u8 *p = (const u8 *)b;
		u32 z = 1, f = 1;
		for (u32 k = 0; k < lens[i]; k++) {
			z &= p[k] == 0;
			f &= p[k] == p[0];
		}
		zero += z;
		flat += f;
		u64 c = bufs;
		for (u32 j = 0; j < i; j++) {
			same += !memcmp((const void *)c, p, 16);
			c += lens[j];
		}
		b += lens[i];
	}
	kv_dec("zero_bufs", zero);
	kv_dec("flat_bufs", flat);
	kv_dec("same_pairs", same);
	virtio_take_irq(VIRTIO_VECTOR, vio.msix ? &vio.irqs : &vio.hits, before);
	eol();
}

/* the driver breaks the protocol: the available index runs ahead of the
 * device by more than the queue size, then a notification */
static void virtio_break(void)
{
	struct vq *q = &vqs[0];
	u32 used = used_idx(q), before = vio.msix ? vio.cfg_irqs : vio.hits;
	u16 bad = (u16)(q->avail_idx + q->size + 1);
	vq_publish_and_notify(q, bad);
	u32 n = VPOLL(vc8(VC_STATUS) & VS_NEEDS_RESET, 2000);
	vstep("break");
	kv_dec("avail_idx", bad);
	kv_dec("ahead", (u16)(bad - used));
	kv_dec("polls", n);
	kv_hex("status", vc8(VC_STATUS));
	kv_dec("used_idx", used_idx(q));
	kv_dec("used_before", used);
	if (vio.msix)
		virtio_take_irq(VIRTIO_CFG_VECTOR, &vio.cfg_irqs, before);
	else
		virtio_take_irq(VIRTIO_VECTOR, &vio.hits, before);
	kv_hex("generation", vc8(VC_GEN));
	eol();
}


/* ---- virtio-blk requests ------------------------------------------------- */

/* where a request's parts lie in queue 0's ring page: header, status byte, write-zeroes
 * segment, identifier, one sector of data */
#define VB_HDR		(VQ_BUFS + 0x000)
#define VB_STATUS	(VQ_BUFS + 0x010)
#define VB_SEG		(VQ_BUFS + 0x020)
#define VB_ID		(VQ_BUFS + 0x040)
#define VB_DATA		(VQ_BUFS + 0x200)
#define VB_SECTOR	512
#define VB_IN		0
#define VB_OUT		1
#define VB_FLUSH	4
#define VB_GET_ID	8
#define VB_WRITE_ZEROES	13
#define VB_PATTERN(i)	((u8)((i) * 7 + 3))

static u32 vblk_before;	/* the interrupt counter before the request */

/* One request as a chain: header (device-readable), `len` bytes at `data`
 * (device-readable, or device-writable when `in`; none when len is 0), the
 * status byte (device-writable, 0xff before).  used_event is the used index
 * before it, so the device interrupts for this one (RING_EVENT_IDX).  Starts
 * the step's line: `type`, `sector`, `status`, the used element (`used_id`,
 * `used_len`); the caller adds its fields, then vblk_done(). */
static void vblk_request(const char *name, u32 type, u64 sector, u64 data, u32 len, int in)
{
	struct vq *q = &vqs[0];
	u64 m = (u64)q->mem, a = m + VQ_AVAIL;
	wr32(m + VB_HDR, type);
	wr32(m + VB_HDR + 4, 0);
	wr32(m + VB_HDR + 8, (u32)sector);
	wr32(m + VB_HDR + 12, (u32)(sector >> 32));
	wr8(m + VB_STATUS, 0xff);
	u32 n = 0;
	vq_desc(q, n++, m + VB_HDR, 16, 1, 1);			/* NEXT */
	if (len) {
		vq_desc(q, n, data, len, (u16)(1 | (in ? 2 : 0)), (u16)(n + 1));
		n++;
	}
	vq_desc(q, n, m + VB_STATUS, 1, 2, 0);			/* WRITE */
	u32 used = used_idx(q);
	wr16(a + 4 + 2 * q->size, (u16)used);			/* used_event */
	wr16(a + 4 + 2 * (q->avail_idx % q->size), 0);		/* head: descriptor 0 */
	q->avail_idx++;
	vblk_before = vio.msix ? vio.irqs : vio.hits;
	vq_publish_and_notify(q, q->avail_idx);
	u32 want = (used + 1) & 0xffff;
	u32 polls = VPOLL(used_idx(q) == want, 2000);
	vstep(name);
	kv_dec("polls", polls);
	kv_dec("type", type);
	kv_dec("sector", sector);
	kv_dec("used_idx", used_idx(q));
	kv_hex("status", rd8(m + VB_STATUS));
	kv_dec("used_id", used_id(q, used));
	kv_dec("used_len", used_len(q, used));
}

static void vblk_done(void)
{
	virtio_take_irq(VIRTIO_VECTOR, vio.msix ? &vio.irqs : &vio.hits, vblk_before);
	eol();
}

/* bytes of the data sector that differ from the pattern; from zero (`zero`) */
static u32 vblk_diff(int zero)
{
	const u8 *p = vqs[0].mem + VB_DATA;
	u32 n = 0;
	for (u32 i = 0; i < VB_SECTOR; i++)
		n += p[i] != (zero ? 0 : VB_PATTERN(i));
	return n;
}

/* virtio-blk: the device configuration, then GET_ID, a write of the pattern
 * to sector 1, FLUSH, sector 1 read back, sector 0 read, WRITE_ZEROES on
 * sector 2 (when offered) and sector 2 read back, a read at sector
 * `capacity` (beyond the disk) */
/* A one-sector read into the data buffer, first filled with 0xa5 so that what the
 * device left alone can be told apart; the caller adds its fields, then vblk_done(). */
static void vblk_read(const char *name, u64 sector)
{
	memset(vqs[0].mem + VB_DATA, 0xa5, VB_SECTOR);
	vblk_request(name, VB_IN, sector, (u64)vqs[0].mem + VB_DATA, VB_SECTOR, 1);
}

static void vblk_requests(void)
{
	u8 *mem = vqs[0].mem;
	u64 m = (u64)mem, dv = vio.device;
	u32 g0 = vc8(VC_GEN);
	u64 cap = rd32(dv) | (u64)rd32(dv + 4) << 32;
	u32 seg_max = rd32(dv + 12), blk_size = rd32(dv + 20), numq = rd16(dv + 34);
	u32 wz_sectors = rd32(dv + 48), wz_seg = rd32(dv + 52);
	u32 g1 = vc8(VC_GEN);
	u32 f = vio.accepted_lo;
	vstep("blk-config");
	kv_dec("capacity", cap);
	kv_dec("blk_size", blk_size);
	kv_dec("seg_max", seg_max);
	kv_dec("num_queues", numq);
	kv_dec("max_write_zeroes_sectors", wz_sectors);
	kv_dec("max_write_zeroes_seg", wz_seg);
	kv_dec("generation", g1);
	kv_dec("stable", g0 == g1);
	kv_dec("ro", !!(f & VBF_RO));
	kv_dec("flush", !!(f & VBF_FLUSH));
	kv_dec("blk_size_f", !!(f & VBF_BLK_SIZE));
	kv_dec("write_zeroes", !!(f & VBF_WRITE_ZEROES));
	kv_dec("discard", !!(f & VBF_DISCARD));
	eol();

	memset(mem + VB_ID, 0, 20);
	vblk_request("get-id", VB_GET_ID, 0, m + VB_ID, 20, 1);
	u32 idn = 0;
	while (idn < 20 && mem[VB_ID + idn])
		idn++;
	key("serial");
	put_escaped(mem + VB_ID, idn, 0);
	kv_dec("serial_len", idn);
	vblk_done();

	for (u32 i = 0; i < VB_SECTOR; i++)
		mem[VB_DATA + i] = VB_PATTERN(i);
	vblk_request("write", VB_OUT, 1, m + VB_DATA, VB_SECTOR, 0);
	vblk_done();

	vblk_request("flush", VB_FLUSH, 0, 0, 0, 0);
	vblk_done();

	/* pyhv.blk-pause: wait for a line on COM1 here (the host restarts the disk's
	 * backend meanwhile); the read below then checks what the write left */
	if (has_switch("pyhv.blk-pause"))
		echo_line();

	vblk_read("read", 1);
	kv_dec("diff", vblk_diff(0));
	vblk_done();

	vblk_read("read0", 0);
	kv_hex("csum", checksum(m + VB_DATA, VB_SECTOR));
	vblk_done();

	if (f & VBF_WRITE_ZEROES) {
		wr32(m + VB_SEG, 2);		/* sector 2, 1 sector, flags 0 */
		wr32(m + VB_SEG + 4, 0);
		wr32(m + VB_SEG + 8, 1);
		wr32(m + VB_SEG + 12, 0);
		vblk_request("write-zeroes", VB_WRITE_ZEROES, 0, m + VB_SEG, 16, 0);
		vblk_done();
		vblk_read("read2", 2);
		kv_dec("nonzero", vblk_diff(1));
		vblk_done();
	}

	vblk_read("read-oob", cap);
	u32 kept = 0;	/* bytes of the buffer the device left alone */
	for (u32 i = 0; i < VB_SECTOR; i++)
		kept += mem[VB_DATA + i] == 0xa5;
	kv_dec("kept", kept);
	vblk_done();
}

/* DRIVER_OK: device_status, config_generation, device_status again through the
 * PCI-cfg window, the ISR (a read acknowledges), the PCI interrupt status */
static void virtio_driver_ok(void)
{
	u32 bdf = vio.bdf;
	vw8(VC_STATUS, vc8(VC_STATUS) | VS_DRIVER_OK);
	vstep("driver-ok");
	kv_hex("status", vc8(VC_STATUS));
	kv_hex("generation", vc8(VC_GEN));
	if (vio.pcicfg) {	/* device_status again, through the PCI-cfg window */
		u32 p = vio.pcicfg;
		cfg_wr(bdf, p + 4, (cfg_rd(bdf, p + 4) & ~0xffu) | vio.common_bar);
		cfg_wr(bdf, p + 8, vio.common_off + VC_STATUS);
		cfg_wr(bdf, p + 12, 1);
		kv_hex("pcicfg_status", cfg_rd(bdf, p + 16) & 0xff);
	}
	kv_hex("isr", rd8(vio.isr));
	kv_dec("intsts", intsts(bdf));
	eol();
}

/* ---- virtio-console (pyhv.virtio-console=msix|intx) ---------------------- */

/*
 * virtio 1.2 5.3 with VIRTIO_CONSOLE_F_MULTIPORT: queues 0/1 port 0's
 * receiveq/transmitq, 2/3 the control receiveq (device to driver) and
 * transmitq, 4/5 port 1's; only these six are set up.  Every buffer is
 * VCON_BUF bytes at VQ_BUFS + VCON_BUF * i of its queue's ring page, always
 * behind descriptor i (transmit queues: i = the available index modulo the
 * size, one buffer in flight).  Interrupts stay on from DRIVER_OK to the
 * reset (the handlers count them); the driver polls the used rings, reading
 * the control receiveq in every wait (vcon_ctrl_poll: one `ctrl` line a
 * message, whatever step it arrives in).
 */
#define VCON_BUF	64
#define VCON_RX_BUFS	4		/* buffers on each port's receiveq */
#define VCON_P0_RX	0
#define VCON_P0_TX	1
#define VCON_CTRL_RX	2
#define VCON_CTRL_TX	3
#define VCON_P1_RX	4
#define VCON_P1_TX	5
#define VCON_QUEUES	6
#define VCON_HOST_MS	3000		/* waits for the host end (within the PM timer's wrap) */
/* control events */
#define VCON_DEVICE_READY 0
#define VCON_DEVICE_ADD	1
#define VCON_PORT_READY	3
#define VCON_CONSOLE_PORT 4
#define VCON_PORT_OPEN	6
#define VCON_PORT_NAME	7

static struct {
	/* ports (bit = id, ids below 32) the control messages named: added,
	 * console, named, host end open (the last PORT_OPEN's value) */
	u32 added, consoles, named, host_open;
	u32 msgs;			/* control messages received */
	u8 name[VCON_BUF];		/* port 1's name as sent */
	u32 name_len;
	u8 line[VCON_BUF - 5];		/* what port 1 received ("echo:" + it fits a buffer) */
	u32 line_len, line_done, rx_bufs;
} vcon;

/* `len` bytes (at most VCON_BUF) on transmit queue q, published, notified;
 * the used index polled: the rounds (VPOLL_FAIL: never used) */
static u32 vcon_send(struct vq *q, const void *data, u32 len)
{
	u32 d = q->avail_idx % q->size;
	u64 b = (u64)q->mem + VQ_BUFS + VCON_BUF * d;
	memcpy((void *)b, data, len);
	vq_add(q, d, b, len, 0);
	vq_publish_and_notify(q, q->avail_idx);
	u32 n = VPOLL(used_idx(q) == q->avail_idx, 1000);
	q->used_seen = q->avail_idx;
	return n;
}

/* the last buffer sent on q as used: `prefix`polls, used_idx, used_id, used_len */
static void vcon_sent(struct vq *q, u32 polls, const char *prefix)
{
	u32 i = (u16)(q->avail_idx - 1), n = 0;
	char k[24];
	static const char *const names[4] = {"polls", "used_idx", "used_id", "used_len"};
	u32 v[4] = {polls, used_idx(q), used_id(q, i), used_len(q, i)};
	while (prefix[n] && n < 12) {
		k[n] = prefix[n];
		n++;
	}
	for (u32 f = 0; f < 4; f++) {
		u32 m = 0;
		while ((k[n + m] = names[f][m]))
			m++;
		kv_dec(k, v[f]);
	}
}

/* a control message: le32 id, le16 event, le16 value */
static u32 vcon_ctrl(u32 id, u32 event, u32 value)
{
	u8 m[8];
	for (u32 i = 0; i < 4; i++)
		m[i] = (u8)(id >> (8 * i));
	m[4] = (u8)event;
	m[5] = (u8)(event >> 8);
	m[6] = (u8)value;
	m[7] = (u8)(value >> 8);
	return vcon_send(&vqs[VCON_CTRL_TX], m, 8);
}

/* a receive buffer back on its queue, zeroed, notified */
static void vcon_rx_refill(struct vq *q, u32 d)
{
	u64 b = (u64)q->mem + VQ_BUFS + VCON_BUF * d;
	memset((void *)b, 0, VCON_BUF);
	vq_add(q, d, b, VCON_BUF, 2);
	vq_publish_and_notify(q, q->avail_idx);
}

/* Every control message used since the last call, in order: the state above
 * updated, DEVICE_ADD answered with PORT_READY(id, 1), one `ctrl` line each
 * (seq, event, id, value, the used len; PORT_NAME: name_len and the name
 * escaped; DEVICE_ADD: the answer's used element), the buffer put back. */
static void vcon_ctrl_poll(void)
{
	struct vq *q = &vqs[VCON_CTRL_RX];
	while (q->used_seen != (u16)used_idx(q)) {
		u32 i = q->used_seen++, d = used_id(q, i), len = used_len(q, i);
		if (d >= q->size) {
			error("virtio-console-bad-used-id", "id", d);
			continue;
		}
		u64 b = (u64)q->mem + VQ_BUFS + VCON_BUF * d;
		u32 id = rd32(b), ev = rd16(b + 4), val = rd16(b + 6);
		u32 bit = id < 32 ? 1u << id : 0, answer = VPOLL_FAIL + 1;
		u32 nlen = len > VCON_BUF ? VCON_BUF - 8 : len > 8 ? len - 8 : 0;
		vcon.msgs++;
		if (ev == VCON_DEVICE_ADD) {
			vcon.added |= bit;
			answer = vcon_ctrl(id, VCON_PORT_READY, 1);
		} else if (ev == VCON_CONSOLE_PORT && val) {
			vcon.consoles |= bit;
		} else if (ev == VCON_PORT_NAME) {
			vcon.named |= bit;
			if (id == 1) {
				memcpy(vcon.name, (const void *)(b + 8), nlen);
				vcon.name_len = nlen;
			}
		} else if (ev == VCON_PORT_OPEN) {
			vcon.host_open = val ? vcon.host_open | bit : vcon.host_open & ~bit;
		}
		vstep("ctrl");
		kv_dec("seq", vcon.msgs);
		kv_dec("event", ev);
		kv_dec("id", id);
		kv_dec("value", val);
		kv_dec("len", len);
		if (ev == VCON_PORT_NAME) {
			kv_dec("name_len", nlen);
			if (nlen) {
				key("name");
				put_escaped((const u8 *)(b + 8), nlen, 0);
			}
		}
		if (answer <= VPOLL_FAIL) {
			kv_dec("answer", VCON_PORT_READY);
			vcon_sent(&vqs[VCON_CTRL_TX], answer, "answer_");
		}
		eol();
		vcon_rx_refill(q, d);
	}
}

/* Port 1's receiveq: the bytes of every used buffer appended to vcon.line
 * (buffers put back) until a newline or a full line; 1 then. */
static int vcon_rx_line(void)
{
	struct vq *q = &vqs[VCON_P1_RX];
	while (!vcon.line_done && q->used_seen != (u16)used_idx(q)) {
		u32 i = q->used_seen++, d = used_id(q, i), len = used_len(q, i);
		if (d >= q->size) {
			error("virtio-console-bad-used-id", "id", d);
			continue;
		}
		const u8 *b = q->mem + VQ_BUFS + VCON_BUF * d;
		for (u32 k = 0; k < len && k < VCON_BUF; k++) {
			if (vcon.line_len < sizeof(vcon.line))
				vcon.line[vcon.line_len++] = b[k];
			if (b[k] == '\n')
				vcon.line_done = 1;
		}
		if (vcon.line_len == sizeof(vcon.line))
			vcon.line_done = 1;
		vcon.rx_bufs++;
		vcon_rx_refill(q, d);
	}
	return vcon.line_done;
}

/* Wait (interrupts on) until `done` holds, reading control messages each
 * round; bounded as VPOLL. */
#define VCON_WAIT(done, ms) ({							\
	u32 _n = 0, _t0 = pm_ticks();						\
	while ((vcon_ctrl_poll(), !(done)) && _n < VPOLL_FAIL &&		\
	       ((pm_ticks() - _t0) & 0xffffff) < (u32)(ms) * 3580)		\
		_n++;								\
	(done) ? _n : VPOLL_FAIL; })

static void vcon_run(void)
{
	u64 dv = vio.device;
	u32 n;
	memset(&vcon, 0, sizeof(vcon));
	vstep("console-config");
	kv_dec("cols", rd16(dv));
	kv_dec("rows", rd16(dv + 2));
	kv_dec("max_nr_ports", rd32(dv + 4));
	kv_dec("multiport", !!(vio.accepted_lo & VCF_MULTIPORT));
	kv_hex("generation", vc8(VC_GEN));
	eol();
	if (!(vio.accepted_lo & VCF_MULTIPORT)) {
		error("virtio-console-no-multiport", 0, 0);
		return;
	}

	/* queues 0-5 set up and enabled, the others left alone */
	for (u32 i = 0; i < VCON_QUEUES; i++) {
		vw16(VC_QSELECT, (u16)i);
		u32 before = vc16(VC_QMSIX);
		u32 max = vq_setup(&vqs[i], i, 0);
		vw16(VC_QENABLE, 1);
		vstep("queue");
		kv_dec("index", i);
		vq_report(&vqs[i], max, before);
		eol();
	}
	u32 numq = vc16(VC_NUMQ), others = 0;
	for (u32 i = VCON_QUEUES; i < numq && i < 256; i++) {
		vw16(VC_QSELECT, (u16)i);
		others += vc16(VC_QENABLE) != 0;
	}

	/* receive buffers: the control receiveq full, VCON_RX_BUFS on each port's */
	static const u32 rxq[3] = {VCON_P0_RX, VCON_CTRL_RX, VCON_P1_RX};
	for (u32 r = 0; r < 3; r++) {
		struct vq *q = &vqs[rxq[r]];
		u32 nb = rxq[r] == VCON_CTRL_RX ? q->size : VCON_RX_BUFS;
		for (u32 d = 0; d < nb && d < q->size; d++)
			vq_add(q, d, (u64)q->mem + VQ_BUFS + VCON_BUF * d, VCON_BUF, 2);
		wr16((u64)q->mem + VQ_AVAIL + 2, q->avail_idx);
	}
	vstep("fill");
	kv_dec("others_enabled", others);
	kv_dec("rx0", vqs[VCON_P0_RX].avail_idx);
	kv_dec("ctrl_rx", vqs[VCON_CTRL_RX].avail_idx);
	kv_dec("rx1", vqs[VCON_P1_RX].avail_idx);
	eol();

	virtio_driver_ok();
	__asm__ volatile("sti" ::: "memory");
	for (u32 r = 0; r < 3; r++)
		vq_publish_and_notify(&vqs[rxq[r]], vqs[rxq[r]].avail_idx);

	n = vcon_ctrl(0, VCON_DEVICE_READY, 1);
	vstep("device-ready");
	vcon_sent(&vqs[VCON_CTRL_TX], n, "");
	eol();

	/* both ports added (each answered PORT_READY), port 0 the console,
	 * port 1 named */
	n = VCON_WAIT((vcon.added & 3) == 3 && (vcon.consoles & 1) && (vcon.named & 2), 2000);
	vstep("ports");
	kv_dec("polls", n);
	kv_hex("added", vcon.added);
	kv_hex("consoles", vcon.consoles);
	kv_hex("named", vcon.named);
	kv_hex("host_open", vcon.host_open);
	kv_dec("name_len", vcon.name_len);
	eol();

	for (u32 port = 0; port < 2; port++) {
		n = vcon_ctrl(port, VCON_PORT_OPEN, 1);
		vstep("open");
		kv_dec("port", port);
		vcon_sent(&vqs[VCON_CTRL_TX], n, "");
		eol();
	}

	static const char hello0[] = "hello hvc0\n", hello1[] = "hello port1\n";
	n = vcon_send(&vqs[VCON_P0_TX], hello0, sizeof(hello0) - 1);
	vstep("write0");
	kv_dec("len", sizeof(hello0) - 1);
	vcon_sent(&vqs[VCON_P0_TX], n, "");
	eol();

	/* the host end of port 1 connected (maybe already) */
	u32 early = !!(vcon.host_open & 2);
	n = VCON_WAIT(vcon.host_open & 2, VCON_HOST_MS);
	vstep("wait-open");
	kv_dec("polls", n);
	kv_dec("early", early);
	kv_dec("open", !!(vcon.host_open & 2));
	eol();

	n = vcon_send(&vqs[VCON_P1_TX], hello1, sizeof(hello1) - 1);
	vstep("write1");
	kv_dec("len", sizeof(hello1) - 1);
	vcon_sent(&vqs[VCON_P1_TX], n, "");
	eol();

	n = VCON_WAIT(vcon_rx_line(), VCON_HOST_MS);
	vstep("read1");
	kv_dec("polls", n);
	kv_dec("len", vcon.line_len);
	key("data");
	put_escaped(vcon.line, vcon.line_len, 0);
	kv_dec("bufs", vcon.rx_bufs);
	eol();

	u8 echo[VCON_BUF];
	memcpy(echo, "echo:", 5);
	memcpy(echo + 5, vcon.line, vcon.line_len);
	n = vcon_send(&vqs[VCON_P1_TX], echo, 5 + vcon.line_len);
	vstep("echo");
	kv_dec("len", 5 + vcon.line_len);
	vcon_sent(&vqs[VCON_P1_TX], n, "");
	eol();

	n = vcon_ctrl(1, VCON_PORT_OPEN, 0);
	vcon_ctrl_poll();
	vstep("close");
	vcon_sent(&vqs[VCON_CTRL_TX], n, "");
	kv_dec("rx0_used", used_idx(&vqs[VCON_P0_RX]));
	kv_dec("msgs", vcon.msgs);
	eol();
	__asm__ volatile("cli" ::: "memory");
}

/* ---- virtio-net (pyhv.virtio-net=msix|intx) ------------------------------ */

/*
 * virtio 1.2 5.1 without VIRTIO_NET_F_MQ: queue 0 receiveq1, 1 transmitq1,
 * 2 the controlq.  Every packet has the 12-byte struct virtio_net_hdr (num_buffers
 * last; with VERSION_1 it is always there), zero on transmit.  The receiveq holds
 * VNET_RX_BUFS buffers of VNET_RX_LEN bytes (the header and a 1514-byte frame) in
 * vnet_bufs, one descriptor each (descriptor i: buffer i), put back zeroed once
 * read.  One frame is in flight on the transmitq at a time, from its ring page
 * (header +0x400, frame +0x40c): as one descriptor (0), or header and frame as a
 * chain (0, 1).  One command at a time on the controlq: its class and command at
 * +0x400, the command's data at +0x410 (each part its own device-readable
 * descriptor), the ack byte at +0x7f0 (device-writable, 0xff before).
 * Interrupts are on from DRIVER_OK to the reset (the handlers count them); the
 * driver polls the used rings.  The frames it takes from the receiveq are
 * counted per step: `frames` (ethertype VNET_ETH_TEST), `others`, `foreign`
 * (unicast to another MAC).
 */
#define VNF_MTU		(1u << 3)
#define VNF_MAC		(1u << 5)
#define VNF_MRG_RXBUF	(1u << 15)
#define VNF_STATUS	(1u << 16)
#define VNF_CTRL_VQ	(1u << 17)
#define VNF_CTRL_RX	(1u << 18)
#define VNF_MQ		(1u << 22)
#define VNF_CTRL_MAC_ADDR (1u << 23)
#define VNF_RSS_HI	(1u << 28)	/* high half: bit 60 */
#define VNF_WANT	(VNF_MAC | VNF_MRG_RXBUF | VNF_STATUS | VNF_CTRL_VQ | VNF_CTRL_RX | \
			 VNF_CTRL_MAC_ADDR)
#define VNF_NEED	(VNF_MAC | VNF_STATUS | VNF_CTRL_VQ | VNF_CTRL_RX)
#define VNET_RXQ	0
#define VNET_TXQ	1
#define VNET_CTRLQ	2
#define VNET_QUEUES	3
#define VNET_HDR	12
#define VNET_FRAME_MAX	1514
#define VNET_RX_LEN	(VNET_HDR + VNET_FRAME_MAX)
#define VNET_RX_STRIDE	1536
#define VNET_RX_BUFS	4
#define VNET_MIN_FRAME	60
#define VNET_KEEP	64		/* bytes of a received frame kept for the report */
#define VNET_HOST_MS	3000		/* waits for the host (within the PM timer's wrap) */
#define VNET_ETH_TEST	0x88b5		/* IEEE local experimental ethertype */
#define VNET_ETH_ARP	0x0806
#define VNET_IP		0x0a00020fu	/* 10.0.2.15: the guest's address */
#define VNET_TX_HDR	(VQ_BUFS + 0x000)
#define VNET_TX_FRAME	(VQ_BUFS + VNET_HDR)
#define VNET_CTRL_CMD	(VQ_BUFS + 0x000)
#define VNET_CTRL_DATA	(VQ_BUFS + 0x010)
#define VNET_CTRL_ACK	(VQ_BUFS + 0x3f0)
#define VNET_S_LINK_UP	1

static u8 vnet_bufs[VNET_RX_BUFS][VNET_RX_STRIDE] __attribute__((aligned(64)));

static struct {
	u8 mac[6];
	/* the last frame taken from the receiveq: its used element, header, length
	 * (without the header) and first VNET_KEEP bytes */
	u32 id, used_len, len, flags, gso, num_buffers;
	u8 frame[VNET_KEEP];
	u32 frames, others, foreign;	/* frames taken in this step (see above) */
	int found;			/* vnet_rx_until's match, until cleared */
} vnet;

static u32 be16at(const u8 *p) { return (u32)p[0] << 8 | p[1]; }
static u32 be32at(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }

static void kv_mac(const char *k, const u8 *m)
{
	key(k);
	for (u32 i = 0; i < 6; i++) {
		if (i)
			putc_(':');
		put_hexn(m[i], 2);
	}
}

static void kv_ip(const char *k, u32 ip)
{
	key(k);
	for (u32 i = 0; i < 4; i++) {
		if (i)
			putc_('.');
		put_dec((ip >> (24 - 8 * i)) & 0xff);
	}
}

/* receive buffer d back on the receiveq, zeroed (published, notified) */
static void vnet_rx_refill(u32 d)
{
	struct vq *q = &vqs[VNET_RXQ];
	memset(vnet_bufs[d], 0, VNET_RX_STRIDE);
	vq_add(q, d, (u64)vnet_bufs[d], VNET_RX_LEN, 2);
	vq_publish_and_notify(q, q->avail_idx);
}

/* The next used receive buffer into vnet (counted, put back): 1, or 0 when the
 * device used none since the last call. */
static int vnet_rx_one(void)
{
	struct vq *q = &vqs[VNET_RXQ];
	if (q->used_seen == (u16)used_idx(q))
		return 0;
	u32 i = q->used_seen++, d = used_id(q, i), len = used_len(q, i);
	if (d >= VNET_RX_BUFS) {
		error("virtio-net-bad-used-id", "id", d);
		return 0;
	}
	const u8 *b = vnet_bufs[d];
	vnet.id = d;
	vnet.used_len = len;
	vnet.flags = b[0];
	vnet.gso = b[1];
	vnet.num_buffers = rd16((u64)b + 10);
	vnet.len = len > VNET_HDR ? len - VNET_HDR : 0;
	memset(vnet.frame, 0, VNET_KEEP);
	memcpy(vnet.frame, b + VNET_HDR, vnet.len < VNET_KEEP ? vnet.len : VNET_KEEP);
	if (vnet.len >= 14 && be16at(vnet.frame + 12) == VNET_ETH_TEST)
		vnet.frames++;
	else
		vnet.others++;
	if (!(vnet.frame[0] & 1) && memcmp(vnet.frame, vnet.mac, 6))
		vnet.foreign++;
	vnet_rx_refill(d);
	return 1;
}

static int vnet_is_test(void) { return vnet.len >= 14 && be16at(vnet.frame + 12) == VNET_ETH_TEST; }

static int vnet_is_arp_for_us(void)
{
	const u8 *f = vnet.frame;
	return vnet.len >= 42 && be16at(f + 12) == VNET_ETH_ARP && be16at(f + 14) == 1 &&
	       be16at(f + 16) == 0x0800 && f[18] == 6 && f[19] == 4 && be16at(f + 20) == 1 &&
	       be32at(f + 38) == VNET_IP;
}

static int vnet_is_mine(void) { return vnet_is_test() && !memcmp(vnet.frame, vnet.mac, 6); }

/* Frames taken until one that `match`es (1, and from then on until vnet.found
 * is cleared: VPOLL tests its condition once more), or none is left (0). */
static int vnet_rx_until(int (*match)(void))
{
	if (vnet.found)
		return 1;
	while (vnet_rx_one())
		if (match())
			return vnet.found = 1;
	return 0;
}

/* a frame's first fields: its used element, header, length, addresses, type */
static void vnet_rx_report(void)
{
	kv_dec("used_id", vnet.id);
	kv_dec("used_len", vnet.used_len);
	kv_dec("len", vnet.len);
	kv_hex("hdr_flags", vnet.flags);
	kv_hex("gso_type", vnet.gso);
	kv_dec("num_buffers", vnet.num_buffers);
	kv_mac("dst", vnet.frame);
	kv_mac("src", vnet.frame + 6);
	kv_hex("ethertype", be16at(vnet.frame + 12));
}

/* the test frame's payload up to its first NUL (`data`), and its bytes after
 * that which are not zero (`pad_nonzero`) */
static void vnet_payload_report(void)
{
	u32 end = vnet.len < VNET_KEEP ? vnet.len : VNET_KEEP, n = 14, nz = 0;
	while (n < end && vnet.frame[n])
		n++;
	key("data");
	put_escaped(vnet.frame + 14, n - 14, 0);
	for (u32 k = n; k < end; k++)
		nz += vnet.frame[k] != 0;
	kv_dec("pad_nonzero", nz);
}

static void vnet_counts(void)
{
	kv_dec("frames", vnet.frames);
	kv_dec("others", vnet.others);
	kv_dec("foreign", vnet.foreign);
	vnet.frames = vnet.others = vnet.foreign = 0;
	vnet.found = 0;
}

/* kv_dec with the key `prefix` + `k` */
static void kv_dec_p(const char *prefix, const char *k, u64 v)
{
	char buf[32];
	u32 n = 0;
	while (prefix[n] && n < 15) {
		buf[n] = prefix[n];
		n++;
	}
	for (u32 i = 0; k[i] && n < sizeof(buf) - 1; i++)
		buf[n++] = k[i];
	buf[n] = 0;
	kv_dec(buf, v);
}

/* `len` bytes of frame (at the transmitq's VNET_TX_FRAME) after a zeroed header,
 * as one descriptor or (`chain`) header and frame as two; published, notified,
 * the used index polled.  The step's fields (each key after `prefix`): `polls`,
 * `len`, `descs`, the used element. */
static void vnet_send(u32 len, int chain, const char *prefix)
{
	struct vq *q = &vqs[VNET_TXQ];
	u64 m = (u64)q->mem;
	memset((void *)(m + VNET_TX_HDR), 0, VNET_HDR);
	if (chain) {
		vq_desc(q, 0, m + VNET_TX_HDR, VNET_HDR, 1, 1);	/* NEXT */
		vq_desc(q, 1, m + VNET_TX_FRAME, len, 0, 0);
	} else {
		vq_desc(q, 0, m + VNET_TX_HDR, VNET_HDR + len, 0, 0);
	}
	wr16(m + VQ_AVAIL + 4 + 2 * (q->avail_idx % q->size), 0);	/* head: 0 */
	q->avail_idx++;
	vq_publish_and_notify(q, q->avail_idx);
	u32 n = VPOLL(used_idx(q) == q->avail_idx, 1000);
	q->used_seen = q->avail_idx;
	u32 i = (u16)(q->avail_idx - 1);
	kv_dec_p(prefix, "polls", n);
	kv_dec_p(prefix, "len", len);
	kv_dec_p(prefix, "descs", chain ? 2 : 1);
	kv_dec_p(prefix, "used_idx", used_idx(q));
	kv_dec_p(prefix, "used_id", used_id(q, i));
	kv_dec_p(prefix, "used_len", used_len(q, i));
}

/* a broadcast frame of ethertype VNET_ETH_TEST carrying `text`, 60 bytes */
static void vnet_send_test(const char *name, const char *text)
{
	u8 *f = vqs[VNET_TXQ].mem + VNET_TX_FRAME;
	u32 n = 0;
	memset(f, 0, VNET_MIN_FRAME);
	memset(f, 0xff, 6);
	memcpy(f + 6, vnet.mac, 6);
	f[12] = VNET_ETH_TEST >> 8;
	f[13] = VNET_ETH_TEST & 0xff;
	while (text[n] && 14 + n < VNET_MIN_FRAME) {
		f[14 + n] = (u8)text[n];
		n++;
	}
	vstep(name);
	key("data");
	put_escaped(f + 14, n, 0);
	vnet_send(VNET_MIN_FRAME, 0, "");
	eol();
}

/* One controlq command: class, command, then each part of its data (`parts`
 * pointers and lengths) a device-readable descriptor, the ack byte last.  The
 * step's fields: `class`, `command`, `ack`, the used element. */
static void vnet_ctrl(const char *name, u32 cls, u32 cmd, const u8 *const *parts,
		      const u32 *lens, u32 nparts)
{
	struct vq *q = &vqs[VNET_CTRLQ];
	u64 m = (u64)q->mem, data = m + VNET_CTRL_DATA;
	u32 d = 0;
	wr8(m + VNET_CTRL_CMD, (u8)cls);
	wr8(m + VNET_CTRL_CMD + 1, (u8)cmd);
	wr8(m + VNET_CTRL_ACK, 0xff);
	vq_desc(q, d, m + VNET_CTRL_CMD, 2, 1, (u16)(d + 1));
	d++;
	for (u32 p = 0; p < nparts; p++) {
		memcpy((void *)data, parts[p], lens[p]);
		vq_desc(q, d, data, lens[p], 1, (u16)(d + 1));
		data += (lens[p] + 15) & ~15u;
		d++;
	}
	vq_desc(q, d, m + VNET_CTRL_ACK, 1, 2, 0);		/* WRITE */
	wr16(m + VQ_AVAIL + 4 + 2 * (q->avail_idx % q->size), 0);
	q->avail_idx++;
	vq_publish_and_notify(q, q->avail_idx);
	u32 n = VPOLL(used_idx(q) == q->avail_idx, 1000);
	q->used_seen = q->avail_idx;
	u32 i = (u16)(q->avail_idx - 1);
	vstep(name);
	kv_dec("polls", n);
	kv_dec("class", cls);
	kv_dec("command", cmd);
	kv_dec("descs", d + 1);
	kv_hex("ack", rd8(m + VNET_CTRL_ACK));
	kv_dec("used_idx", used_idx(q));
	kv_dec("used_id", used_id(q, i));
	kv_dec("used_len", used_len(q, i));
	eol();
}

static void vnet_run(void)
{
	u64 dv = vio.device;
	u32 f = vio.accepted_lo, n;
	memset(&vnet, 0, sizeof(vnet));
	vio.isr_late = 0;
	/* a field is read only when the feature that makes it exist is offered */
	vw32(VC_DFSELECT, 0);
	u32 offered = vc32(VC_DF);
	vw32(VC_DFSELECT, 1);
	u32 offered_hi = vc32(VC_DF);
	int has_pairs = (offered & VNF_MQ) || (offered_hi & VNF_RSS_HI);
	u32 g0 = vc8(VC_GEN);
	for (u32 i = 0; i < 6; i++)
		vnet.mac[i] = rd8(dv + i);
	u32 status = rd16(dv + 6);
	u32 pairs = has_pairs ? rd16(dv + 8) : 0, mtu = offered & VNF_MTU ? rd16(dv + 10) : 0;
	u32 g1 = vc8(VC_GEN);
	vstep("net-config");
	kv_mac("mac", vnet.mac);
	kv_hex("status", status);
	if (has_pairs)
		kv_dec("max_pairs", pairs);
	else
		kv_str("max_pairs", "none");
	if (offered & VNF_MTU)
		kv_dec("mtu", mtu);
	else
		kv_str("mtu", "none");
	kv_dec("generation", g1);
	kv_dec("stable", g0 == g1);
	kv_dec("mac_f", !!(f & VNF_MAC));
	kv_dec("status_f", !!(f & VNF_STATUS));
	kv_dec("mrg_rxbuf", !!(f & VNF_MRG_RXBUF));
	kv_dec("ctrl_vq", !!(f & VNF_CTRL_VQ));
	kv_dec("ctrl_rx", !!(f & VNF_CTRL_RX));
	kv_dec("ctrl_mac_addr", !!(f & VNF_CTRL_MAC_ADDR));
	eol();
	if ((f & VNF_NEED) != VNF_NEED) {
		error("virtio-net-missing-features", "missing", VNF_NEED & ~f);
		return;
	}

	/* queues 0-2 set up and enabled, the others left alone */
	for (u32 i = 0; i < VNET_QUEUES; i++) {
		vw16(VC_QSELECT, (u16)i);
		u32 before = vc16(VC_QMSIX);
		u32 max = vq_setup(&vqs[i], i, 1);
		vw16(VC_QENABLE, 1);
		vstep("queue");
		kv_dec("index", i);
		vq_report(&vqs[i], max, before);
		eol();
	}
	u32 numq = vc16(VC_NUMQ), others = 0;
	for (u32 i = VNET_QUEUES; i < numq && i < 256; i++) {
		vw16(VC_QSELECT, (u16)i);
		others += vc16(VC_QENABLE) != 0;
	}

	struct vq *rx = &vqs[VNET_RXQ];
	memset(vnet_bufs, 0, sizeof(vnet_bufs));
	for (u32 d = 0; d < VNET_RX_BUFS && d < rx->size; d++)
		vq_add(rx, d, (u64)vnet_bufs[d], VNET_RX_LEN, 2);
	wr16((u64)rx->mem + VQ_AVAIL + 2, rx->avail_idx);
	vstep("fill");
	kv_dec("others_enabled", others);
	kv_dec("rx", rx->avail_idx);
	kv_dec("buf_len", VNET_RX_LEN);
	eol();

	virtio_driver_ok();
	__asm__ volatile("sti" ::: "memory");
	vq_publish_and_notify(rx, rx->avail_idx);

	/* 1: hello, to everyone */
	vnet_send_test("tx-hello", "pyhv-net hello");

	/* 2: the host's answer (the first test frame) */
	n = VPOLL(vnet_rx_until(vnet_is_test), VNET_HOST_MS);
	vstep("rx");
	kv_dec("polls", n);
	vnet_rx_report();
	vnet_payload_report();
	vnet_counts();
	eol();

	/* 3: an ARP request for VNET_IP, answered (header and frame two descriptors) */
	n = VPOLL(vnet_rx_until(vnet_is_arp_for_us), VNET_HOST_MS);
	vstep("arp");
	kv_dec("polls", n);
	vnet_rx_report();
	const u8 *rq = vnet.frame;
	kv_dec("op", be16at(rq + 20));
	kv_mac("sha", rq + 22);
	kv_ip("spa", be32at(rq + 28));
	kv_ip("tpa", be32at(rq + 38));
	vnet_counts();
	if (n < VPOLL_FAIL) {
		u8 *r = vqs[VNET_TXQ].mem + VNET_TX_FRAME;
		memset(r, 0, VNET_MIN_FRAME);
		memcpy(r, rq + 22, 6);				/* to the requester */
		memcpy(r + 6, vnet.mac, 6);
		r[12] = VNET_ETH_ARP >> 8;
		r[13] = VNET_ETH_ARP & 0xff;
		r[15] = 1;					/* Ethernet */
		r[16] = 0x08;					/* IPv4 */
		r[18] = 6;
		r[19] = 4;
		r[21] = 2;					/* reply */
		memcpy(r + 22, vnet.mac, 6);
		for (u32 i = 0; i < 4; i++)
			r[28 + i] = (u8)(VNET_IP >> (24 - 8 * i));
		memcpy(r + 32, rq + 22, 10);			/* target: the sender */
		vnet_send(VNET_MIN_FRAME, 1, "reply_");
	}
	eol();

	/* 4: the receive filter: promiscuous off, our MAC the only unicast entry */
	static const u8 off[1] = {0};
	const u8 *p1[1] = {off};
	const u32 l1[1] = {1};
	vnet_ctrl("ctrl-promisc", 0, 0, p1, l1, 1);		/* VIRTIO_NET_CTRL_RX_PROMISC */
	u8 uni[10] = {1, 0, 0, 0}, multi[4] = {0, 0, 0, 0};
	memcpy(uni + 4, vnet.mac, 6);
	const u8 *p2[2] = {uni, multi};
	const u32 l2[2] = {10, 4};
	vnet_ctrl("ctrl-mac", 1, 0, p2, l2, 2);			/* VIRTIO_NET_CTRL_MAC_TABLE_SET */
	while (vnet_rx_one())		/* nothing is expected: counted in `filter` */
		;
	vnet_send_test("tx-filter", "pyhv-net filter");
	n = VPOLL(vnet_rx_until(vnet_is_mine), VNET_HOST_MS);
	vstep("filter");
	kv_dec("polls", n);
	vnet_rx_report();
	vnet_payload_report();
	vnet_counts();
	eol();

	/* 5: the link goes down (the host's doing, once told) */
	u32 cfg0 = vio.cfg_irqs;
	vio.isr_late = 0;
	vnet_send_test("tx-link", "pyhv-net link");
	n = VPOLL(!(rd16(dv + 6) & VNET_S_LINK_UP), VNET_HOST_MS);
	u32 st = rd16(dv + 6);
	u32 m = VPOLL(vio.msix ? vio.cfg_irqs != cfg0 : (vio.isr_late & 2) != 0, 1000);
	vstep("link");
	kv_dec("polls", n);
	kv_hex("status", st);
	kv_hex("status_before", status);
	kv_dec("irq_polls", m);
	kv_dec("config_irq", vio.msix ? vio.cfg_irqs != cfg0 : (vio.isr_late & 2) != 0);
	kv_dec("cfg_irqs", vio.cfg_irqs - cfg0);
	kv_hex("isr", vio.isr_late);
	kv_dec("generation", vc8(VC_GEN));
	while (vnet_rx_one())		/* nothing more is expected */
		;
	vnet_counts();
	eol();
	__asm__ volatile("cli" ::: "memory");
}

/* ---- virtio-9p (pyhv.virtio-9p=msix|intx) -------------------------------- */

/*
 * virtio 1.2 5.11 (9P transport): one request queue; each request is one chain,
 * the T-message in device-readable buffers, then room for the R-message in a
 * device-writable one.  The device configuration is le16 tag_len and the mount
 * tag (VIRTIO_9P_MOUNT_TAG).  A small 9P2000.L client, one request at a time,
 * each polled until used (interrupts on from DRIVER_OK to the reset, counted by
 * the handlers): messages are size[4] type[1] tag[2] and the fields,
 * little-endian; strings len[2] and the bytes; a qid type[1] version[4] path[8].
 * In queue 0's ring page: the T-message at +0x400 (descriptor 0), a Twrite's
 * payload at +0x600 (descriptor 1, its own buffer), the room for the R-message
 * at +0x700 (zeroed before each request; the last descriptor).
 */
#define V9F_MOUNT_TAG	(1u << 0)
#define V9_T		(VQ_BUFS + 0x000)
#define V9_DATA		(VQ_BUFS + 0x200)
#define V9_R		(VQ_BUFS + 0x300)
#define V9_RLEN		(VQ_MEM - V9_R)
#define V9_MSIZE	8192
#define V9_NOFID	0xffffffffu
#define V9_NOTAG	0xffff
#define V9_RLERROR	7
#define V9_TLOPEN	12
#define V9_TLCREATE	14
#define V9_TGETATTR	24
#define V9_TREADDIR	40
#define V9_TFSYNC	50
#define V9_TVERSION	100
#define V9_TATTACH	104
#define V9_TWALK	110
#define V9_TREAD	116
#define V9_TWRITE	118
#define V9_TCLUNK	120
#define V9_KEEP		64		/* bytes of read data / a name reported at most */

static struct {
	u32 n;			/* bytes of the T-message built so far */
	u16 tag;		/* the next tag */
	u32 rtype;		/* the reply's type (0: none) */
	u8 root[13];		/* the attach qid */
} vp9;

static u8 *vp9_t(void) { return vqs[0].mem + V9_T; }
static const u8 *vp9_r(void) { return vqs[0].mem + V9_R; }

static void vp9_put(u64 v, u32 bytes)
{
	for (u32 i = 0; i < bytes; i++)
		vp9_t()[vp9.n++] = (u8)(v >> (8 * i));
}

static void vp9_str(const char *s)
{
	u32 n = 0;
	while (s[n])
		n++;
	vp9_put(n, 2);
	memcpy(vp9_t() + vp9.n, s, n);
	vp9.n += n;
}

/* a new T-message of `type` (Tversion: NOTAG, the others the next tag) */
static void vp9_begin(u32 type)
{
	vp9.n = 4;
	vp9_put(type, 1);
	vp9_put(type == V9_TVERSION ? V9_NOTAG : vp9.tag++, 2);
}

static u64 vp9_get(u32 off, u32 bytes)
{
	u64 v = 0;
	for (u32 i = 0; i < bytes; i++)
		v |= (u64)vp9_r()[off + i] << (8 * i);
	return v;
}

/* the qid at `off` of the R-message */
static void kv_qid(u32 off)
{
	kv_dec("qid_type", vp9_get(off, 1));
	kv_dec("qid_version", vp9_get(off + 1, 4));
	kv_hex("qid_path", vp9_get(off + 5, 8));
}

/* Send the T-message built (its size field `lie` bytes more than it has; `data`
 * of `dlen` bytes as a second readable buffer, counted in the size), poll its
 * used element and open the step line: `polls`, `ttag` (the tag sent), the used
 * element, and when the device wrote a header `size`, `type`, `tag` (`type=none`
 * else), Rlerror's `ecode`.  1 when the reply is R-`type` (T + 1). */
static int vp9_rpc(const char *name, const void *data, u32 dlen, u32 lie)
{
	struct vq *q = &vqs[0];
	u64 m = (u64)q->mem;
	u32 type = vp9_t()[4], ttag = vp9_t()[5] | (u32)vp9_t()[6] << 8, size = vp9.n + dlen;
	u8 *t = vp9_t();
	for (u32 i = 0; i < 4; i++)
		t[i] = (u8)((size + lie) >> (8 * i));
	memset((void *)(m + V9_R), 0, V9_RLEN);
	u32 d = 0;
	vq_desc(q, d, m + V9_T, vp9.n, 1, (u16)(d + 1));		/* NEXT */
	d++;
	if (dlen) {
		memcpy((void *)(m + V9_DATA), data, dlen);
		vq_desc(q, d, m + V9_DATA, dlen, 1, (u16)(d + 1));
		d++;
	}
	vq_desc(q, d, m + V9_R, V9_RLEN, 2, 0);			/* WRITE */
	wr16(m + VQ_AVAIL + 4 + 2 * (q->avail_idx % q->size), 0);	/* head: 0 */
	q->avail_idx++;
	vq_publish_and_notify(q, q->avail_idx);
	u32 n = VPOLL(used_idx(q) == q->avail_idx, 1000);
	q->used_seen = q->avail_idx;
	u32 i = (u16)(q->avail_idx - 1), len = used_len(q, i);
	vstep(name);
	kv_dec("polls", n);
	kv_dec("ttag", ttag);
	kv_dec("descs", d + 1);
	kv_dec("used_idx", used_idx(q));
	kv_dec("used_id", used_id(q, i));
	kv_dec("used_len", len);
	vp9.rtype = 0;
	if (n < VPOLL_FAIL && len >= 7) {
		vp9.rtype = vp9_r()[4];
		kv_dec("size", vp9_get(0, 4));
		kv_dec("type", vp9.rtype);
		kv_dec("tag", vp9_get(5, 2));
		if (vp9.rtype == V9_RLERROR)
			kv_dec("ecode", vp9_get(7, 4));
	} else {
		kv_str("type", "none");
	}
	return vp9.rtype == type + 1;
}

static void vp9_walk(const char *name, u32 fid, u32 newfid, const char *const *names, u32 n)
{
	vp9_begin(V9_TWALK);
	vp9_put(fid, 4);
	vp9_put(newfid, 4);
	vp9_put(n, 2);
	for (u32 k = 0; k < n; k++)
		vp9_str(names[k]);
	if (vp9_rpc(name, 0, 0, 0)) {
		u32 nq = (u32)vp9_get(7, 2), at_root = 0;
		kv_dec("nwqid", nq);
		for (u32 k = 0; k < nq; k++) {		/* type and path: the version may move */
			const u8 *qd = vp9_r() + 9 + 13 * k;
			at_root += qd[0] == vp9.root[0] && !memcmp(qd + 5, vp9.root + 5, 8);
		}
		kv_dec("at_root", at_root);
		if (nq)
			kv_qid(9 + 13 * (nq - 1));		/* the last one */
	}
	eol();
}

static void vp9_simple(const char *name, u32 type, u32 fid)
{
	vp9_begin(type);
	vp9_put(fid, 4);
	vp9_rpc(name, 0, 0, 0);
	eol();
}

static void vp9_lopen(const char *name, u32 fid, u32 flags)
{
	vp9_begin(V9_TLOPEN);
	vp9_put(fid, 4);
	vp9_put(flags, 4);
	if (vp9_rpc(name, 0, 0, 0)) {
		kv_qid(7);
		kv_dec("iounit", vp9_get(20, 4));
	}
	eol();
}

/* Tgetattr(fid, all the basic fields); `lie`: the size field lies */
static void vp9_getattr(const char *name, u32 fid, u32 lie)
{
	vp9_begin(V9_TGETATTR);
	vp9_put(fid, 4);
	vp9_put(0x7ff, 8);				/* P9_GETATTR_BASIC */
	if (vp9_rpc(name, 0, 0, lie)) {
		u32 mode = (u32)vp9_get(28, 4);		/* valid[8] qid[13] mode[4] uid gid */
		kv_hex("valid", vp9_get(7, 8));
		kv_qid(15);
		kv_hex("mode", mode);
		kv_dec("ftype", mode >> 12);
		kv_dec("uid", vp9_get(32, 4));
		kv_dec("gid", vp9_get(36, 4));
	}
	eol();
}

static void vp9_run(void)
{
	u64 dv = vio.device;
	struct vq *q = &vqs[0];
	static const char hello[] = "written by the guest\n";
	memset(&vp9, 0, sizeof(vp9));
	vp9.tag = 1;
	u32 g0 = vc8(VC_GEN);
	u32 tag_len = rd16(dv);
	u8 tag[V9_KEEP];
	for (u32 i = 0; i < tag_len && i < V9_KEEP; i++)
		tag[i] = rd8(dv + 2 + i);
	u32 g1 = vc8(VC_GEN);
	vstep("p9-config");
	kv_dec("tag_len", tag_len);
	key("tag");
	put_escaped(tag, tag_len < V9_KEEP ? tag_len : V9_KEEP, 0);
	kv_dec("mount_tag", !!(vio.accepted_lo & V9F_MOUNT_TAG));
	kv_dec("generation", g1);
	kv_dec("stable", g0 == g1);
	eol();

	vw16(VC_QSELECT, 0);
	u32 before = vc16(VC_QMSIX);
	u32 max = vq_setup(q, 0, 1);
	vw16(VC_QENABLE, 1);
	vstep("queue");
	kv_dec("index", 0);
	vq_report(q, max, before);
	eol();

	virtio_driver_ok();
	__asm__ volatile("sti" ::: "memory");

	/* 1: the version */
	vp9_begin(V9_TVERSION);
	vp9_put(V9_MSIZE, 4);
	vp9_str("9P2000.L");
	if (vp9_rpc("version", 0, 0, 0)) {
		u32 vl = (u32)vp9_get(11, 2);
		kv_dec("msize", vp9_get(7, 4));
		key("version");
		put_escaped(vp9_r() + 13, vl < V9_KEEP ? vl : V9_KEEP, 0);
	}
	eol();

	/* 2: the root as fid 1 */
	vp9_begin(V9_TATTACH);
	vp9_put(1, 4);
	vp9_put(V9_NOFID, 4);
	vp9_str("root");
	vp9_str("");
	vp9_put(0, 4);
	if (vp9_rpc("attach", 0, 0, 0)) {
		memcpy(vp9.root, vp9_r() + 7, 13);
		kv_qid(7);
	}
	eol();

	/* 3: hello.txt read as fid 2 */
	static const char *const file[1] = {"hello.txt"};
	vp9_walk("walk", 1, 2, file, 1);
	vp9_lopen("lopen", 2, 0);				/* O_RDONLY */
	vp9_begin(V9_TREAD);
	vp9_put(2, 4);
	vp9_put(0, 8);
	vp9_put(256, 4);
	if (vp9_rpc("read", 0, 0, 0)) {
		u32 c = (u32)vp9_get(7, 4);
		kv_dec("count", c);
		kv_hex("csum", checksum((u64)vp9_r() + 11, c));
		key("data");
		put_escaped(vp9_r() + 11, c < V9_KEEP ? c : V9_KEEP, 0);
	}
	eol();
	vp9_simple("clunk-file", V9_TCLUNK, 2);

	/* 4: from-guest.txt created through fid 3 (a clone of the root), written */
	vp9_walk("walk-new", 1, 3, 0, 0);
	vp9_begin(V9_TLCREATE);
	vp9_put(3, 4);
	vp9_str("from-guest.txt");
	vp9_put(01 | 0100, 4);				/* O_WRONLY | O_CREAT */
	vp9_put(0644, 4);
	vp9_put(0, 4);					/* gid */
	int created = vp9_rpc("lcreate", 0, 0, 0);
	if (created) {
		kv_qid(7);
		kv_dec("iounit", vp9_get(20, 4));
	}
	eol();
	if (created) {
		vp9_begin(V9_TWRITE);
		vp9_put(3, 4);
		vp9_put(0, 8);
		vp9_put(sizeof(hello) - 1, 4);
		if (vp9_rpc("write", hello, sizeof(hello) - 1, 0))
			kv_dec("count", vp9_get(7, 4));
		eol();
		vp9_begin(V9_TFSYNC);
		vp9_put(3, 4);
		vp9_put(0, 4);				/* datasync */
		vp9_rpc("fsync", 0, 0, 0);
		eol();
	}
	vp9_simple("clunk-new", V9_TCLUNK, 3);

	/* 5: the root's attributes */
	vp9_getattr("getattr", 1, 0);

	/* 6: out of the export? */
	static const char *const up[3] = {"..", "..", "etc"};
	vp9_walk("walk-dotdot", 1, 4, up, 3);

	/* 7: the root's entries (fid 5) */
	vp9_walk("walk-dir", 1, 5, 0, 0);
	vp9_lopen("lopen-dir", 5, 0);
	vp9_begin(V9_TREADDIR);
	vp9_put(5, 4);
	vp9_put(0, 8);
	vp9_put(1024, 4);
	if (vp9_rpc("readdir", 0, 0, 0)) {
		u32 c = (u32)vp9_get(7, 4), off = 11, end = 11 + c, nent = 0;
		kv_dec("count", c);
		key("names");
		while (off + 24 <= end && end <= V9_RLEN) {	/* qid[13] offset[8] type[1] name[s] */
			u32 nl = (u32)vp9_get(off + 22, 2);
			if (off + 24 + nl > end)
				break;
			if (nent++)
				putc_(',');
			put_escaped(vp9_r() + off + 24, nl < V9_KEEP ? nl : V9_KEEP, 0);
			off += 24 + nl;
		}
		if (!nent)
			puts_("none");
		kv_dec("entries", nent);
	}
	eol();
	vp9_simple("clunk-dir", V9_TCLUNK, 5);

	/* 8: a request whose size field claims 16 bytes more than the chain has, then
	 * the same request told truthfully */
	vp9_getattr("lie", 1, 16);
	vp9_getattr("after-lie", 1, 0);
	__asm__ volatile("cli" ::: "memory");
}

static void virtio_run(struct vdevrec *d)
{
	u32 bdf = d->bdf;
	memset(&vio, 0, sizeof(vio));
	u32 type = d->id >> 16;
	vio.msix = !has_switch(type == 0x1043 ? "pyhv.virtio-console=intx" :
			       type == 0x1041 ? "pyhv.virtio-net=intx" :
			       type == 0x1049 ? "pyhv.virtio-9p=intx" : "pyhv.virtio=intx");
	vio.want_lo = type == 0x1042 ? VBF_WANT : type == 0x1043 ? VCF_MULTIPORT :
		      type == 0x1041 ? VNF_WANT : type == 0x1049 ? V9F_MOUNT_TAG : VF_EVENT_IDX;
	vio.dev = (u32)(d - vdevs);
	vio.bdf = bdf;

	/* vendor capabilities (the first of each type) and MSI-X */
	u32 found[6] = {0}, cbar[6] = {0}, coff[6] = {0}, clen[6] = {0}, caplen[6] = {0};
	u32 nvendor = 0, ncaps = 0;
	if (cfg_rd(bdf, 0x04) & (0x10 << 16)) {
		for (u32 p = cfg_rd(bdf, 0x34) & 0xfc; p >= 0x40 && ncaps < 48; ncaps++) {
			u32 c = cfg_rd(bdf, p);
			if ((c & 0xff) == 0x09) {
				u32 t = c >> 24;
				nvendor++;
				if (t >= 1 && t <= 5 && !found[t]) {
					found[t] = p;
					caplen[t] = (c >> 16) & 0xff;
					cbar[t] = cfg_rd(bdf, p + 4) & 0xff;
					coff[t] = cfg_rd(bdf, p + 8);
					clen[t] = cfg_rd(bdf, p + 12);
					if (t == 2)
						vio.mult = cfg_rd(bdf, p + 16);
				}
			} else if ((c & 0xff) == 0x11 && !vio.msix_cap) {
				vio.msix_cap = p;
				vio.msix_size = ((c >> 16) & 0x7ff) + 1;
				vio.msix_table_reg = cfg_rd(bdf, p + 4);
				vio.msix_pba_reg = cfg_rd(bdf, p + 8);
			}
			p = (c >> 8) & 0xfc;
		}
	}
	vio.pcicfg = found[5];
	vio.common_bar = cbar[1];
	vio.common_off = coff[1];
	line("virtio");
	kv_dec("dev", vio.dev);
	key("bdf");
	put_bdf(bdf);
	key("id");
	put_hexn(d->id & 0xffff, 4);
	putc_(':');
	put_hexn(d->id >> 16, 4);
	kv_str("mode", vio.msix ? "msix" : "intx");
	eol();

	static const char *const names[6] = {0, "common", "notify", "isr", "device", "pcicfg"};
	vstep("caps");
	kv_dec("vendor_caps", nvendor);
	for (u32 t = 1; t <= 5; t++) {
		u32 nl = 0;
		while (names[t][nl])
			nl++;
		char k[16];
		memcpy(k, names[t], nl);
		if (!found[t]) {
			memcpy(k + nl, "_bar", 5);
			kv_str(k, "none");
			continue;
		}
		memcpy(k + nl, "_caplen", 8);
		kv_dec(k, caplen[t]);
		if (t == 5)
			continue;	/* its bar/offset/length are the driver's to set */
		memcpy(k + nl, "_bar", 5);
		kv_dec(k, cbar[t]);
		memcpy(k + nl, "_off", 5);
		kv_hex(k, coff[t]);
		memcpy(k + nl, "_len", 5);
		kv_hex(k, clen[t]);
	}
	kv_dec("notify_mult", vio.mult);
	kv_dec("msix_size", vio.msix_cap ? vio.msix_size : 0);
	kv_dec("msix_table_bar", vio.msix_table_reg & 7);
	kv_hex("msix_table_off", vio.msix_table_reg & ~7u);
	kv_dec("msix_pba_bar", vio.msix_pba_reg & 7);
	kv_hex("msix_pba_off", vio.msix_pba_reg & ~7u);
	eol();

	/* every structure in a memory BAR the walk saw, reachable */
	u64 base[6] = {0};
	for (u32 t = 1; t <= 4; t++) {
		u32 b = cbar[t];
		u64 v = b < 6 ? d->value[b] : 0;
		if (!found[t] || !v || (v & 1) || coff[t] + (u64)clen[t] > d->size[b]) {
			error("virtio-bad-cap", "type", t);
			return;
		}
		u64 a = v & ~15UL;
		if (!map_high(a, d->size[b])) {
			error("virtio-unmappable", "addr", a);
			return;
		}
		base[t] = a + coff[t];
	}
	vio.common = base[1];
	vio.notify = base[2];
	vio.isr = base[3];
	vio.device = base[4];
	if (vio.msix) {
		u32 tb = vio.msix_table_reg & 7;
		u64 tv = vio.msix_cap && tb < 6 ? d->value[tb] : 0;
		if (!tv || (tv & 1) || !map_high(tv & ~15UL, d->size[tb])) {
			error("virtio-no-msix", "bdf", bdf);
			return;
		}
		vio.msix_table = (tv & ~15UL) + (vio.msix_table_reg & ~7u);
		vio.cfg_entry = vio.msix_size > 1 ? 1 : 0;
	}
	u32 cb = cbar[1];
	vstep("map");
	kv_dec("bar", cb);
	kv_str("space", (d->value[cb] & 6) == 4 ? "mem64" : "mem32");
	kv_hex("base", d->value[cb] & ~15UL);
	kv_hex("size", d->size[cb]);
	kv_str("map", mapped(d->value[cb] & ~15UL, d->size[cb]) ? "low" : "high");
	eol();

	/* interrupts: IF clear, the 8259s masked (firmware may have left the
	 * timer on), the local APIC on, the handlers in the IDT */
	__asm__ volatile("cli" ::: "memory");
	lapic_setup();
	if (acpi.madt_flags & 1) {
		outb(0x21, 0xff);
		outb(0xa1, 0xff);
	}
	lapic_write(0x80, 0);
	lapic_write(0xf0, 0x1ff);
	set_gate(VIRTIO_VECTOR, (u64)virtio_queue_irq);
	set_gate(VIRTIO_CFG_VECTOR, (u64)virtio_config_irq);

	u32 cmd = cfg_rd(bdf, 0x04) & 0xffff;
	cfg_wr(bdf, 0x04, (cmd | 0x6) & ~0x400u);	/* memory, bus master, INTx on */
	vstep("enable");
	kv_hex("cmd", cmd);
	kv_hex("now", cfg_rd(bdf, 0x04) & 0xffff);
	eol();

	virtio_reset("reset");
	virtio_negotiate(0);
	virtio_interrupts();

	if (d->id >> 16 == 0x1043) {
		vcon_run();
		goto stop;
	}
	if (d->id >> 16 == 0x1041) {
		vnet_run();
		goto stop;
	}
	if (d->id >> 16 == 0x1049) {
		vp9_run();
		goto stop;
	}
	virtio_queue(0);

	vw16(VC_QENABLE, 1);
	vstep("queue-enable");
	kv_hex("enable", vc16(VC_QENABLE));
	eol();

	virtio_driver_ok();

	if (d->id >> 16 == 0x1042) {
		vblk_requests();
		goto stop;
	}
	static const u32 four[4] = {16, 16, 16, 64}, one[1] = {32};
	virtio_requests("requests", four, 4);
	virtio_break();

	virtio_reset("reset2");
	u32 s = virtio_negotiate(1);
	if (vio.msix)
		vw16(VC_MSIX, (u16)vio.cfg_entry);
	virtio_queue(1);
	vw16(VC_QENABLE, 1);
	vw8(VC_STATUS, (u8)(s | VS_DRIVER_OK));
	vstep("reinit");
	kv_hex("features_ok", s);
	kv_hex("status", vc8(VC_STATUS));
	kv_hex("config_vector", vc16(VC_MSIX));
	kv_hex("queue_vector", vc16(VC_QMSIX));
	kv_dec("size", vc16(VC_QSIZE));
	kv_hex("enable", vc16(VC_QENABLE));
	eol();
	virtio_requests("request2", one, 1);

stop:
	/* leave it quiet: reset, MSI-X off, the IOAPIC pin masked */
	vw8(VC_STATUS, 0);
	u32 n = VPOLL(vc8(VC_STATUS) == 0, 1000);
	if (vio.msix)
		msix_control(0);
	else if (vio.ioapic_pin != 0xff)
		ioapic_write(0x10 + 2 * vio.ioapic_pin, 1 << 16);
	vstep("stop");
	kv_dec("polls", n);
	kv_hex("status", vc8(VC_STATUS));
	kv_hex("msix_control", vio.msix_cap ? cfg_rd(bdf, vio.msix_cap) >> 16 : 0);
	kv_dec("irqs", vio.irqs);
	kv_dec("cfg_irqs", vio.cfg_irqs);
	kv_dec("hits", vio.hits);
	kv_hex("isr_all", vio.isr_all);
	eol();
}

static void report_virtio(int virtio_sw, int console_sw, int net_sw, int p9_sw)
{
	for (u32 i = 0; i < nvirtio; i++) {
		u32 type = vdevs[i].id >> 16;
		if (((type == 0x1044 || type == 0x1042) && virtio_sw) ||	/* rng, blk */
		    (type == 0x1043 && console_sw) ||			/* console */
		    (type == 0x1041 && net_sw) ||				/* net */
		    (type == 0x1049 && p9_sw)) {				/* 9p */
			virtio_run(&vdevs[i]);
			continue;
		}
		vio.dev = i;
		line("virtio");
		kv_dec("dev", i);
		key("bdf");
		put_bdf(vdevs[i].bdf);
		key("id");
		put_hexn(vdevs[i].id & 0xffff, 4);
		putc_(':');
		put_hexn(vdevs[i].id >> 16, 4);
		kv_str("mode", "none");
		eol();
		vstep("skipped");
		kv_dec("type", (vdevs[i].id >> 16) - 0x1040);
		eol();
	}
	line("virtio-end");
	kv_dec("devices", nvirtio);
	kv_str("mode", has_switch(virtio_sw ? "pyhv.virtio=intx" : console_sw ?
				  "pyhv.virtio-console=intx" : net_sw ? "pyhv.virtio-net=intx" :
				  "pyhv.virtio-9p=intx") ? "intx" : "msix");
	eol();
}

/* ---- PCI Express native hotplug (pyhv.hotplug) --------------------------- */

/*
 * A polling hotplug driver in the manner of Linux's pciehp, from the PCI
 * Express Base Specification (7.5.3.9-7.5.3.11 Slot Capabilities, Control and
 * Status; 7.5.3.6-7.5.3.8 Link Capabilities and Status; 6.7 the hotplug
 * model), on the first empty hot-plug capable root port the walk's buses
 * hold.  No interrupts are taken: the port's INTx is read from its PCI status
 * register's Interrupt Status bit.  Slot Control and Slot Status are written
 * as 16-bit registers (as pciehp does), so clearing a status bit is never a
 * command.  Each step is one "@hotplug step=NAME ..." line; `step=ready` and
 * `step=unplug-ready` are the host's cues to add the card and to ask for it
 * back.  Waits are bounded by the PM timer (HP_HOST_MS for the host's doings);
 * one that runs out reports "step=timeout timeout=STEP wait=WHAT" and ends
 * the section.
 */
#define HP_HOST_MS	20000		/* waits for the host: the card, the button */
#define HP_CMD_MS	1000		/* Command Completed (pciehp: 1 s) */
#define HP_LINK_MS	2000		/* Data Link Layer Link Active */
#define HP_GONE_MS	5000		/* Presence Detect State drops after power off */
#define HPOLL_FAIL	0xffffffffu	/* rounds of a poll whose condition never held */

/* inside the PCI Express capability */
#define PX_LNKCAP	0x0c
#define PX_LNKSTA	0x12
#define PX_SLTCAP	0x14
#define PX_SLTCTL	0x18
#define PX_SLTSTA	0x1a
#define LNKCAP_DLLLARC	(1u << 20)
#define LNKSTA_DLLLA	(1u << 13)
#define SLTCAP_ABP	(1u << 0)
#define SLTCAP_PCP	(1u << 1)
#define SLTCAP_AIP	(1u << 3)
#define SLTCAP_PIP	(1u << 4)
#define SLTCAP_HPS	(1u << 5)
#define SLTCAP_HPC	(1u << 6)
#define SLTCAP_NCCS	(1u << 18)
#define SLTCTL_ABPE	(1u << 0)
#define SLTCTL_PDCE	(1u << 3)
#define SLTCTL_HPIE	(1u << 5)
#define SLTCTL_PIC	(3u << 8)
#define SLTCTL_PIC_ON	(1u << 8)
#define SLTCTL_PIC_OFF	(3u << 8)
#define SLTCTL_PCC	(1u << 10)
#define SLTCTL_DLLSCE	(1u << 12)
#define SLTSTA_ABP	(1u << 0)
#define SLTSTA_PDC	(1u << 3)
#define SLTSTA_CC	(1u << 4)
#define SLTSTA_PDS	(1u << 6)
#define SLTSTA_DLLSC	(1u << 8)
#define SLTSTA_EVENTS	0x011fu		/* ABP PFD MRLSC PDC CC DLLSC: write 1 to clear */

static struct {
	u32 bdf, cap, slotcap, sec;
	u64 win[3][2], next[3];		/* io, mem, pref: [base, limit]; allocation cursor */
	u64 clock;
	u32 clock_last;
} hp;

/* PM timer ticks, monotonic while called at least every 4.6 s (the timer's
 * 24-bit wrap); without a PM timer the TSC / 1000 stands in. */
static u64 hp_clock(void)
{
	if (!acpi.pm_tmr)
		return rdtsc() / 1000;
	u32 t = pm_ticks();
	hp.clock += (t - hp.clock_last) & 0xffffff;
	hp.clock_last = t;
	return hp.clock;
}

/* Poll until `done` holds, for at most `ms` milliseconds; the rounds it took,
 * HPOLL_FAIL when it never held. */
#define HPOLL(done, ms) ({							\
	u32 _n = 0;								\
	u64 _t0 = hp_clock();							\
	while (!(done) && hp_clock() - _t0 < (u64)(ms) * 3580 && _n < HPOLL_FAIL - 1) \
		_n++;								\
	(done) ? _n : HPOLL_FAIL; })


/* the offset of capability `id` of a function, 0: none */
static u32 pci_cap(u32 bdf, u32 id)
{
	if (!(cfg_rd(bdf, 0x04) & (0x10 << 16)))
		return 0;
	u32 n = 0;
	for (u32 p = cfg_rd(bdf, 0x34) & 0xfc; p >= 0x40 && n < 48; n++) {
		u32 c = cfg_rd(bdf, p);
		if ((c & 0xff) == id)
			return p;
		p = (c >> 8) & 0xfc;
	}
	return 0;
}

static u32 hp_ctl(void) { return cfg_rd(hp.bdf, hp.cap + PX_SLTCTL) & 0xffff; }
static u32 hp_sta(void) { return cfg_rd(hp.bdf, hp.cap + PX_SLTCTL) >> 16; }
static u32 hp_lnk(void) { return cfg_rd(hp.bdf, hp.cap + 0x10) >> 16; }
static void hp_clear(u32 bits) { cfg_wr16(hp.bdf, hp.cap + PX_SLTSTA, (u16)bits); }

static void hp_step(const char *name)
{
	line("hotplug");
	kv_str("step", name);
}

static void hp_bit(const char *k, u32 v, u32 bit) { kv_dec(k, !!(v & bit)); }

/* Slot Control, Slot Status and Link Status as they read now */
static void hp_state(void)
{
	u32 sta = hp_sta(), lnk = hp_lnk();
	kv_hex("slotctl", hp_ctl());
	kv_hex("slotsta", sta);
	hp_bit("pds", sta, SLTSTA_PDS);
	hp_bit("pdc", sta, SLTSTA_PDC);
	hp_bit("abp", sta, SLTSTA_ABP);
	hp_bit("dllsc", sta, SLTSTA_DLLSC);
	hp_bit("cc", sta, SLTSTA_CC);
	kv_hex("lnksta", lnk);
	hp_bit("dllla", lnk, LNKSTA_DLLLA);
	kv_dec("intsts", intsts(hp.bdf));
}

static void hp_timeout(const char *step_name, const char *what)
{
	hp_step("timeout");
	kv_str("timeout", step_name);
	kv_str("wait", what);
	hp_state();
	eol();
}

/* One command: Slot Control written; unless the port has No Command Completed
 * Support, Command Completed polled for and cleared.  The rounds it took
 * (0 with NCCS), HPOLL_FAIL after a timeout (reported). */
static u32 hp_command(u32 ctl, const char *step_name)
{
	cfg_wr16(hp.bdf, hp.cap + PX_SLTCTL, (u16)ctl);
	if (hp.slotcap & SLTCAP_NCCS)
		return 0;
	u32 n = HPOLL(hp_sta() & SLTSTA_CC, HP_CMD_MS);
	if (n == HPOLL_FAIL)
		hp_timeout(step_name, "cc");
	else
		hp_clear(SLTSTA_CC);
	return n;
}

/* the first PCIe root port (type 4) with a hot-plug capable, empty slot on the
 * buses the walk saw */
static int hp_scan(void)
{
	for (u32 bus = 0; bus <= pci.last_bus; bus++) {
		if (!pci.seen[bus])
			continue;
		for (u32 dev = 0; dev < 32; dev++) {
			for (u32 f = 0; f < 8; f++) {
				u32 bdf = bus << 8 | dev << 3 | f, id = cfg_rd(bdf, 0);
				if ((id & 0xffff) == 0xffff || !(id & 0xffff)) {
					if (!f)
						break;
					continue;
				}
				u32 hdr = (cfg_rd(bdf, 0x0c) >> 16) & 0xff;
				u32 cap = (hdr & 0x7f) == 1 ? pci_cap(bdf, 0x10) : 0;
				if (cap && ((cfg_rd(bdf, cap) >> 20) & 0xf) == 4) {
					u32 sc = cfg_rd(bdf, cap + PX_SLTCAP);
					u32 ss = cfg_rd(bdf, cap + PX_SLTCTL) >> 16;
					if ((sc & SLTCAP_HPC) && !(ss & SLTSTA_PDS)) {
						hp.bdf = bdf;
						hp.cap = cap;
						hp.slotcap = sc;
						return 1;
					}
				}
				if (!f && !(hdr & 0x80))
					break;
			}
		}
	}
	return 0;
}

/* the root port's windows as programmed (as the walk reads them) */
static void hp_windows(void)
{
	u32 io = cfg_rd(hp.bdf, 0x1c), mem = cfg_rd(hp.bdf, 0x20), pf = cfg_rd(hp.bdf, 0x24);
	hp.win[0][0] = (io & 0xf0) << 8;
	hp.win[0][1] = (io & 0xf000) | 0xfff;
	if ((io & 0xf) == 1) {
		u32 up = cfg_rd(hp.bdf, 0x30);
		hp.win[0][0] |= (u64)(up & 0xffff) << 16;
		hp.win[0][1] |= (u64)(up >> 16) << 16;
	}
	hp.win[1][0] = (u64)(mem & 0xfff0) << 16;
	hp.win[1][1] = ((u64)(mem >> 16 & 0xfff0) << 16) | 0xfffff;
	hp.win[2][0] = (u64)(pf & 0xfff0) << 16;
	hp.win[2][1] = ((u64)(pf >> 16 & 0xfff0) << 16) | 0xfffff;
	if ((pf & 0xf) == 1) {
		hp.win[2][0] |= (u64)cfg_rd(hp.bdf, 0x28) << 32;
		hp.win[2][1] |= (u64)cfg_rd(hp.bdf, 0x2c) << 32;
	}
	for (int k = 0; k < 3; k++)
		hp.next[k] = hp.win[k][0];
}

static int hp_open(int k) { return hp.win[k][0] <= hp.win[k][1]; }

/* `size` bytes (a power of two), aligned, from window k; 0: no room */
static u64 hp_alloc(int k, u64 size)
{
	u64 a = (hp.next[k] + size - 1) & ~(size - 1);
	if (!hp_open(k) || a < hp.next[k] || a + size - 1 > hp.win[k][1] || a + size < a)
		return 0;
	hp.next[k] = a + size;
	return a;
}

/* Size the card's BARs (decoding is off: the card is fresh) and place each in
 * the port's window: 64-bit prefetchable BARs (and 32-bit prefetchable ones
 * when the window lies below 4 GiB) in the prefetchable window, the others in
 * the memory window; I/O BARs are left unassigned.  Prints " barN=ADDR+SIZE
 * barN_win=mem|pref|io|none" and fills addr[] (0: not assigned). */
static void hp_bars(u32 bdf, u64 addr[6])
{
	for (u32 i = 0; i < 6; i++) {
		u32 reg = 0x10 + 4 * i, index = i;
		u32 lo = cfg_rd(bdf, reg);
		cfg_wr(bdf, reg, ~0u);
		u32 mlo = cfg_rd(bdf, reg);
		addr[i] = 0;
		if (!mlo) {
			cfg_wr(bdf, reg, lo);
			continue;
		}
		u64 mask = mlo & (mlo & 1 ? ~3u : ~15u), a = 0;
		int is64 = !(mlo & 1) && (mlo & 6) == 4 && i < 5, pref = !(mlo & 1) && (mlo & 8);
		u32 hi = 0;
		if (is64) {
			hi = cfg_rd(bdf, reg + 4);
			cfg_wr(bdf, reg + 4, ~0u);
			mask |= (u64)cfg_rd(bdf, reg + 4) << 32;
			i++;
		}
		u64 size = mask & -mask;
		const char *win = "io";
		if (!(mlo & 1)) {
			int k = pref && hp_open(2) && (is64 || hp.win[2][1] < MAPPED_LIMIT) ? 2 : 1;
			a = hp_alloc(k, size);
			if (!a && k == 2 && (is64 || hp.win[1][1] < MAPPED_LIMIT)) {
				k = 1;
				a = hp_alloc(k, size);
			}
			win = !a ? "none" : k == 2 ? "pref" : "mem";
		}
		cfg_wr(bdf, reg, a ? (u32)a : lo);
		if (is64)
			cfg_wr(bdf, reg + 4, a ? (u32)(a >> 32) : hi);
		addr[index] = a;
		char k[12] = "bar0";
		k[3] = (char)('0' + index);
		key(k);
		put_hex(a);
		putc_('+');
		put_hex(size);
		memcpy(k + 4, "_win", 5);
		kv_str(k, win);
	}
}

/* virtio-pci modern: where the device-specific configuration is (cfg_type 4),
 * mapped; 0: not found or not reachable */
static u64 hp_virtio_device_cfg(u32 bdf, const u64 addr[6])
{
	if (!(cfg_rd(bdf, 0x04) & (0x10 << 16)))
		return 0;
	u32 n = 0;
	for (u32 p = cfg_rd(bdf, 0x34) & 0xfc; p >= 0x40 && n < 48; n++) {
		u32 c = cfg_rd(bdf, p);
		if ((c & 0xff) == 0x09 && (c >> 24) == 4) {
			u32 bar = cfg_rd(bdf, p + 4) & 0xff, off = cfg_rd(bdf, p + 8);
			u32 len = cfg_rd(bdf, p + 12);
			if (bar > 5 || !addr[bar] || !len || !map_high(addr[bar] + off, len))
				return 0;
			return addr[bar] + off;
		}
		p = (c >> 8) & 0xfc;
	}
	return 0;
}

static void report_hotplug(void)
{
	/* 1. the slot */
	if (!hp_scan()) {
		hp_step("scan");
		kv_dec("none", 1);
		eol();
		return;
	}
	hp_windows();
	u32 sc = hp.slotcap, lnkcap = cfg_rd(hp.bdf, hp.cap + PX_LNKCAP);
	hp.sec = (cfg_rd(hp.bdf, 0x18) >> 8) & 0xff;
	hp_step("scan");
	key("bdf");
	put_bdf(hp.bdf);
	kv_hex("cap", hp.cap);
	kv_hex("slotcap", sc);
	hp_bit("abp_cap", sc, SLTCAP_ABP);
	hp_bit("pcp", sc, SLTCAP_PCP);
	hp_bit("aip", sc, SLTCAP_AIP);
	hp_bit("pip", sc, SLTCAP_PIP);
	hp_bit("hps", sc, SLTCAP_HPS);
	hp_bit("hpc", sc, SLTCAP_HPC);
	hp_bit("nccs", sc, SLTCAP_NCCS);
	kv_dec("psn", sc >> 19);
	kv_hex("lnkcap", lnkcap);
	hp_bit("dlllarc", lnkcap, LNKCAP_DLLLARC);
	kv_hex("cmd", cfg_rd(hp.bdf, 0x04) & 0xffff);
	kv_hex("sec", hp.sec);
	pci_window("io", hp.win[0][0], hp.win[0][1]);
	pci_window("mem", hp.win[1][0], hp.win[1][1]);
	pci_window("pref", hp.win[2][0], hp.win[2][1]);
	hp_state();
	eol();

	/* 2. events on (stale ones cleared first, as pciehp does), power as found */
	u32 found = hp_ctl(), sta0 = hp_sta();
	hp_clear(SLTSTA_EVENTS);
	u32 ctl = found | SLTCTL_PDCE | SLTCTL_ABPE | SLTCTL_DLLSCE | SLTCTL_HPIE;
	u32 n = hp_command(ctl, "ready");
	if (n == HPOLL_FAIL)
		return;
	hp_step("ready");
	kv_hex("found", found);
	kv_hex("slotsta_found", sta0);
	kv_hex("written", ctl);
	kv_dec("cc_polls", n);
	hp_state();
	eol();

	/* 3. the card arrives */
	n = HPOLL(hp_sta() & SLTSTA_PDC, HP_HOST_MS);
	if (n == HPOLL_FAIL) {
		hp_timeout("added", "pdc");
		return;
	}
	u32 sta = hp_sta();
	hp_step("added");
	kv_dec("polls", n);
	hp_state();
	hp_clear(sta & SLTSTA_EVENTS);
	kv_hex("slotsta_after", hp_sta());
	kv_dec("intsts_after", intsts(hp.bdf));
	eol();

	/* 4. power on (power indicator on), then the link */
	ctl = hp_ctl();
	u32 cc = 0, pcc_was = !!(ctl & SLTCTL_PCC);
	if ((sc & SLTCAP_PCP) && pcc_was) {
		ctl = (ctl & ~(SLTCTL_PCC | SLTCTL_PIC)) | SLTCTL_PIC_ON;
		cc = hp_command(ctl, "powered");
		if (cc == HPOLL_FAIL)
			return;
	}
	if (lnkcap & LNKCAP_DLLLARC) {
		n = HPOLL(hp_lnk() & LNKSTA_DLLLA, HP_LINK_MS);
		if (n == HPOLL_FAIL) {
			hp_timeout("powered", "dllla");
			return;
		}
	} else {
		n = 0;
	}
	udelay(100000);		/* 6.6.1: 100 ms after the link is up before configuration */
	sta = hp_sta();
	hp_step("powered");
	kv_dec("pcc_was", pcc_was);
	kv_hex("written", ctl);
	kv_dec("cc_polls", cc);
	kv_dec("polls", n);
	hp_state();
	hp_clear(sta & SLTSTA_EVENTS);
	kv_hex("slotsta_after", hp_sta());
	kv_dec("intsts_after", intsts(hp.bdf));
	eol();

	/* 5. the card: BARs in the port's windows, decoding on, what it is */
	u32 card = hp.sec << 8, id = cfg_rd(card, 0), cls = cfg_rd(card, 0x08);
	u64 addr[6] = {0};
	hp_step("device");
	key("bdf");
	put_bdf(card);
	kv_hex("vendor", id & 0xffff);
	kv_hex("device", id >> 16);
	if ((id & 0xffff) != 0xffff && (id & 0xffff)) {
		kv_hex("class", cls >> 8);
		kv_hex("hdr", (cfg_rd(card, 0x0c) >> 16) & 0xff);
		hp_bars(card, addr);
		u32 pcmd = cfg_rd(hp.bdf, 0x04) & 0xffff;
		if ((pcmd & 0x6) != 0x6)	/* the port forwards memory and DMA */
			cfg_wr16(hp.bdf, 0x04, (u16)(pcmd | 0x6));
		kv_hex("port_cmd", cfg_rd(hp.bdf, 0x04) & 0xffff);
		cfg_wr16(card, 0x04, (u16)((cfg_rd(card, 0x04) & 0xffff) | 0x6));
		kv_hex("cmd", cfg_rd(card, 0x04) & 0xffff);
		u32 dev = id >> 16;
		if ((id & 0xffff) == 0x1af4 && dev >= 0x1040 && dev <= 0x107f) {
			u64 d = hp_virtio_device_cfg(card, addr);
			if (!d)
				kv_str("device_cfg", "none");
			else if (dev == 0x1042)
				kv_dec("capacity", rd32(d) | (u64)rd32(d + 4) << 32);
			else if (dev == 0x1041) {
				u8 mac[6];
				for (u32 i = 0; i < 6; i++)
					mac[i] = rd8(d + i);
				kv_mac("mac", mac);
			}
		}
	}
	eol();
	hp_step("unplug-ready");
	eol();

	/* 6. the attention button: let go of the card as pciehp does (without its
	 * 5 s of grace), power off with the indicator off, the card leaves */
	n = HPOLL(hp_sta() & SLTSTA_ABP, HP_HOST_MS);
	if (n == HPOLL_FAIL) {
		hp_timeout("button", "abp");
		return;
	}
	hp_step("button");
	kv_dec("polls", n);
	hp_state();
	hp_clear(SLTSTA_ABP);
	kv_hex("slotsta_after", hp_sta());
	eol();
	if ((id & 0xffff) != 0xffff && (id & 0xffff))
		cfg_wr16(card, 0x04, (u16)(cfg_rd(card, 0x04) & 0xfff9));
	ctl = (hp_ctl() & ~SLTCTL_PIC) | SLTCTL_PCC | SLTCTL_PIC_OFF;
	cc = hp_command(ctl, "removed");
	if (cc == HPOLL_FAIL)
		return;
	n = HPOLL(!(hp_sta() & SLTSTA_PDS), HP_GONE_MS);
	if (n == HPOLL_FAIL) {
		hp_timeout("removed", "pds");
		return;
	}
	sta = hp_sta();
	hp_step("removed");
	kv_hex("written", ctl);
	kv_dec("cc_polls", cc);
	kv_dec("polls", n);
	hp_state();
	kv_hex("vendor", cfg_rd(card, 0) & 0xffff);
	hp_clear(sta & SLTSTA_EVENTS);
	kv_hex("slotsta_after", hp_sta());
	kv_dec("intsts_after", intsts(hp.bdf));
	eol();
}

/* ---- RTC interrupts (pyhv.rtc-irq) --------------------------------------- */
/*
 * ISA IRQ 8 through the IOAPIC (edge, active high, after any MADT override) on
 * RTC_VECTOR.  Three phases, each enabling one source in status B and waiting
 * (interrupts on, bounded by the PM timer) for a number of interrupts: the
 * periodic interrupt at 64 Hz (16 of them), the update-ended interrupt (2),
 * and the alarm 2 seconds ahead with don't-care minute and hour (1).  The
 * handler reads status C, which acknowledges the RTC, and counts the flags of
 * the enabled source only.
 */
#define RTC_VECTOR 0x48
static volatile u32 rtc_enabled, rtc_irqs, rtc_hits, rtc_alarm_sec;

static void cmos_w(u8 reg, u8 v)
{
	outb(0x70, reg);
	outb(0x71, v);
}

__attribute__((interrupt)) static void rtc_irq(struct interrupt_frame *f)
{
	(void)f;
	u8 c = cmos(0x0c);
	rtc_irqs++;
	if ((c & 0x80) && (c & rtc_enabled)) {
		rtc_hits++;
		if (rtc_enabled == 0x20)
			rtc_alarm_sec = cmos(0);
	}
	lapic_write(0xb0, 0);
}

static void rtc_phase(const char *source, u8 enable, u32 want, u32 ms)
{
	rtc_hits = 0;
	rtc_enabled = enable;
	(void)cmos(0x0c);
	cmos_w(0x0b, (u8)(cmos(0x0b) | enable));
	/* bounded by the PM timer, or by the TSC (as at most 3 GHz) without one */
	u32 t0 = pm_ticks();
	u64 c0 = rdtsc();
	__asm__ volatile("sti" ::: "memory");
	while (rtc_hits < want) {
		if (acpi.pm_tmr ? ((pm_ticks() - t0) & 0xffffff) >= ms * 3580 :
		    rdtsc() - c0 >= (u64)ms * 3000000)
			break;
		pause();
	}
	__asm__ volatile("cli" ::: "memory");
	u32 took = ((pm_ticks() - t0) & 0xffffff) / 3580;
	cmos_w(0x0b, (u8)(cmos(0x0b) & ~enable));
	rtc_enabled = 0;
	u8 c = cmos(0x0c);
	line("rtc-irq");
	kv_str("source", source);
	kv_dec("want", want);
	kv_dec("got", rtc_hits);
	kv_dec("ok", rtc_hits >= want);
	kv_dec("ms", took);
	kv_hex("c_after", c & 0x80);	/* IRQF is clear once the source is off */
	eol();
}

static void report_rtc_irq(void)
{
	if (!acpi.have_ioapic || cmos(0x0b) == 0xff) {
		error("rtc-irq-unsupported", "ioapic", acpi.have_ioapic);
		return;
	}
	u32 gsi = 8;
	if (acpi.madt) {
		u64 m = acpi.madt, end = m + rd32(m + 4);
		for (u64 p = m + 44; p + 2 <= end && rd8(p + 1) >= 2; p += rd8(p + 1))
			if (rd8(p) == 2 && rd8(p + 3) == 8)
				gsi = rd32(p + 4);
	}
	lapic_setup();
	if (acpi.madt_flags & 1) {	/* PCAT_COMPAT: mask the 8259s */
		outb(0x21, 0xff);
		outb(0xa1, 0xff);
	}
	set_gate(RTC_VECTOR, (u64)rtc_irq);
	u32 pin = gsi - acpi.ioapic_gsi_base;
	lapic_write(0x80, 0);
	lapic_write(0xf0, 0x1ff);
	ioapic_write(0x11 + 2 * pin, lapic_id() << 24);
	ioapic_write(0x10 + 2 * pin, RTC_VECTOR);	/* edge, active high */
	u8 a = cmos(0x0a);
	cmos_w(0x0a, (u8)((a & 0xf0) | 0x0a));		/* rate 10: 64 Hz */
	rtc_phase("periodic", 0x40, 16, 2000);
	cmos_w(0x0a, a);
	rtc_phase("update", 0x10, 2, 3000);
	for (int i = 0; i < 1000 && (cmos(0x0a) & 0x80); i++)
		pause();
	u8 b = cmos(0x0b);
	u32 sec = cmos(0);
	if (!(b & 4))
		sec = bcd(sec);
	sec = (sec + 2) % 60;
	cmos_w(0x01, (u8)((b & 4) ? sec : (sec / 10) << 4 | sec % 10));
	cmos_w(0x03, 0xc0);				/* any minute */
	cmos_w(0x05, 0xc0);				/* any hour */
	rtc_phase("alarm", 0x20, 1, 4000);
	ioapic_write(0x10 + 2 * pin, 1 << 16);		/* masked again */
	u32 seen = rtc_alarm_sec;
	line("rtc-irq-end");
	kv_dec("irqs", rtc_irqs);
	kv_dec("alarm_sec", sec);
	kv_dec("alarm_seen", (b & 4) ? seen : bcd(seen));
	eol();
}

/* ---- CPUID (pyhv.cpuid) -------------------------------------------------- */

/* One "@cpuid leaf=L sub=S eax= ebx= ecx= edx=" line per leaf the guest's CPU
 * model decides (vendor, signature, feature words, PMU, KVM signature, brand),
 * then "@cpuid-vendor vendor=...".  Leaves above the reported maximum are
 * skipped. */
static void cpuid_count(u32 leaf, u32 sub, u32 r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
			 : "a"(leaf), "c"(sub));
}

static void report_cpuid(void)
{
	static const u32 leaves[][2] = {
		{0, 0}, {1, 0}, {6, 0}, {7, 0}, {7, 1}, {0xa, 0}, {0xd, 0}, {0xd, 1},
		{0x40000000, 0}, {0x40000001, 0}, {0x80000000, 0}, {0x80000001, 0},
		{0x80000002, 0}, {0x80000003, 0}, {0x80000004, 0}, {0x80000007, 0},
		{0x80000008, 0},
	};
	u32 r[4], max_basic, max_ext;
	cpuid_count(0, 0, r);
	max_basic = r[0];
	u8 vendor[12];
	for (int i = 0; i < 4; i++) {
		vendor[i] = (u8)(r[1] >> (8 * i));
		vendor[4 + i] = (u8)(r[3] >> (8 * i));
		vendor[8 + i] = (u8)(r[2] >> (8 * i));
	}
	cpuid_count(0x80000000, 0, r);
	max_ext = r[0];
	for (u64 i = 0; i < sizeof(leaves) / sizeof(leaves[0]); i++) {
		u32 leaf = leaves[i][0];
		if ((leaf < 0x40000000 && leaf > max_basic) ||
		    (leaf >= 0x80000000 && leaf > max_ext))
			continue;
		cpuid_count(leaf, leaves[i][1], r);
		line("cpuid");
		kv_hex("leaf", leaf);
		kv_hex("sub", leaves[i][1]);
		kv_hex("eax", r[0]);
		kv_hex("ebx", r[1]);
		kv_hex("ecx", r[2]);
		kv_hex("edx", r[3]);
		eol();
	}
	line("cpuid-vendor");
	key("vendor");
	put_escaped(vendor, 12, 0);
	eol();
}

/* ---- SMBIOS (pyhv.smbios) ----------------------------------------------- */

/* Scan 0xF0000-0xFFFFF in 16-byte steps for the 64-bit "_SM3_" entry point, else
 * the 32-bit "_SM_" one (as Linux's dmi_scan does), check its checksum, walk the
 * structure table and report "@smbios addr= ep=sm3|sm ep_ok= version= table= len=
 * structs= end=" and type 1 as
 * "@smbios-system manufacturer= product= serial= uuid=" (UUID bytes as stored,
 * hex).  "@smbios addr=0" when there is no entry point. */
static const u8 *smbios_str(const u8 *set, const u8 *end, u32 n)
{
	if (!n)
		return 0;
	for (u32 i = 1; set < end && *set; i++) {
		if (i == n)
			return set;
		while (set < end && *set)
			set++;
		set++;
	}
	return 0;
}

static void smbios_kv_str(const char *k, const u8 *set, const u8 *end, u32 n)
{
	const u8 *p = smbios_str(set, end, n);
	u64 len = 0;
	while (p && p + len < end && p[len])
		len++;
	key(k);
	put_escaped(p ? p : (const u8 *)"", len, 0);
}

static void report_smbios(void)
{
	u64 ep = 0, ep2 = 0;
	for (u64 a = 0xf0000; a < 0x100000 && !ep; a += 16) {
		if (!memcmp((const void *)a, "_SM3_", 5))
			ep = a;
		else if (!ep2 && !memcmp((const void *)a, "_SM_", 4))
			ep2 = a;
	}
	line("smbios");
	kv_hex("addr", ep ? ep : ep2);
	if (!ep && !ep2) {
		eol();
		return;
	}
	u64 e = ep ? ep : ep2;
	u8 sum = 0, eplen = rd8(e + (ep ? 6 : 5));
	for (u32 i = 0; i < eplen && i < 0x40; i++)
		sum = (u8)(sum + rd8(e + i));
	u64 table;
	u32 max;
	if (ep) {
		table = rd32(ep + 0x10) | (u64)rd32(ep + 0x14) << 32;
		max = rd32(ep + 0xc);
	} else {
		table = rd32(ep2 + 0x18);
		max = rd16(ep2 + 0x16);
	}
	kv_str("ep", ep ? "sm3" : "sm");
	kv_dec("ep_ok", eplen >= (ep ? 0x18 : 0x1f) && sum == 0);
	kv_hex("version", (u32)rd8(e + (ep ? 7 : 6)) << 8 | rd8(e + (ep ? 8 : 7)));
	kv_hex("table", table);
	kv_dec("len", max);
	if (!mapped(table, max)) {
		eol();
		return;
	}
	const u8 *p = (const u8 *)table, *end = p + max;
	const u8 *sys = 0, *sys_end = 0;
	u32 count = 0, at_end = 0;
	while (p + 4 <= end && p[1] >= 4 && p + p[1] <= end) {
		const u8 *q = p + p[1];
		while (q + 1 < end && (q[0] || q[1]))
			q++;
		q += 2;
		count++;
		if (p[0] == 1 && p[1] >= 0x19) {
			sys = p;
			sys_end = q;
		}
		if (p[0] == 127) {
			at_end = 1;
			break;
		}
		p = q;
	}
	kv_dec("structs", count);
	kv_dec("end", at_end);
	eol();
	if (!sys)
		return;
	const u8 *set = sys + sys[1];
	line("smbios-system");
	smbios_kv_str("manufacturer", set, sys_end, sys[4]);
	smbios_kv_str("product", set, sys_end, sys[5]);
	smbios_kv_str("serial", set, sys_end, sys[7]);
	key("uuid");
	for (u32 i = 0; i < 16; i++) {
		putc_("0123456789abcdef"[sys[8 + i] >> 4]);
		putc_("0123456789abcdef"[sys[8 + i] & 15]);
	}
	eol();
}

/* pyhv.rtc-set: move the RTC one year ahead the way an OS sets it (SET bit,
 * the year register, SET cleared), then report the clock again. */
static void rtc_set_next_year(void)
{
	for (int i = 0; i < 1000 && (cmos(0x0a) & 0x80); i++)
		pause();
	u8 b = cmos(0x0b);
	cmos_w(0x0b, (u8)(b | 0x80));
	u32 y = cmos(9);
	y = ((b & 4) ? y : bcd(y)) + 1;
	y %= 100;
	cmos_w(9, (u8)((b & 4) ? y : (y / 10) << 4 | y % 10));
	cmos_w(0x0b, (u8)(b & 0x7f));
	line("rtc-set");
	kv_dec("year", y);
	eol();
	report_rtc();
}

/* ---- main ---------------------------------------------------------------- */

void guest_main(u32 proto, u64 info)
{
	idt_init();
	boot.proto = proto;
	boot.info = info;
	line("begin");
	kv_str("protocol", proto == PROTO_PVH ? "pvh" : proto == PROTO_LINUX64 ? "linux64" : "linux32");
	kv_hex("info", info);
	eol();
	if (!info || !mapped(info, 0x1000))
		error("no-boot-info", "info", info);
	else if (proto == PROTO_PVH)
		report_pvh(info);
	else
		report_linux(info);
	report_acpi();
	start_aps();
	report_rtc();
	if (has_switch("pyhv.rtc-irq"))
		report_rtc_irq();
	if (has_switch("pyhv.rtc-set"))
		rtc_set_next_year();
	if (has_switch("pyhv.cpuid"))
		report_cpuid();
	if (has_switch("pyhv.smbios"))
		report_smbios();
	int usb_sw = has_switch("pyhv.usb"), barmove_sw = has_switch("pyhv.barmove");
	int virtio_sw = has_switch("pyhv.virtio") || has_switch("pyhv.virtio=msix") ||
		has_switch("pyhv.virtio=intx");
	int console_sw = has_switch("pyhv.virtio-console") ||
		has_switch("pyhv.virtio-console=msix") || has_switch("pyhv.virtio-console=intx");
	int net_sw = has_switch("pyhv.virtio-net") || has_switch("pyhv.virtio-net=msix") ||
		has_switch("pyhv.virtio-net=intx");
	int p9_sw = has_switch("pyhv.virtio-9p") || has_switch("pyhv.virtio-9p=msix") ||
		has_switch("pyhv.virtio-9p=intx");
	int hotplug_sw = has_switch("pyhv.hotplug");
	if (has_switch("pyhv.pci") || usb_sw || barmove_sw || virtio_sw || console_sw || net_sw ||
	    p9_sw || hotplug_sw)
		report_pci();
	if (usb_sw)
		report_usb();
	if (barmove_sw)
		report_barmove();
	if (virtio_sw || console_sw || net_sw || p9_sw)
		report_virtio(virtio_sw, console_sw, net_sw, p9_sw);
	if (hotplug_sw)
		report_hotplug();
	line("end");
	eol();
	if (has_switch("pyhv.wait=powerbutton"))
		wait_powerbutton();
	else if (has_switch("pyhv.wait=reset"))
		reset();
	else if (has_switch("pyhv.wait=echo"))
		echo_line();
	poweroff();
}
