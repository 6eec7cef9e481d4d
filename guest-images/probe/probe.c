/*
 * evm probe guest: a tiny long-mode guest whose work runs in user mode
 * (CPL3), so that it runs at native speed even on a /dev/kvm (PVM) that
 * crawls through guest supervisor code. See README.md next to this file for
 * the entry contract, the command line and the output lines.
 *
 * It uses nothing but evm's ordinary devices: bytes written to the COM1
 * transmit register (port 0x3f8) become stdout lines, and 0x34 written to
 * evm's ACPI power port (0x600) powers the machine off. No interrupts, no
 * supervisor code: any exception triple-faults (KVM reports a shutdown).
 */

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define COM1_THR 0x3f8
#define PM1_CNT 0x600
#define SLEEP_STATUS 0x601
#define WAKE_STATUS 0x80
#define PM1_POWEROFF 0x34

#define PAGE 4096UL
#define MIB (1024UL * 1024UL)
#define MAX_VCPUS 256
#define PAGE_MAGIC 0x45564d50524f4245UL /* "EBORPMVE": page header magic */
#define GOLDEN 0x9e3779b97f4a7c15UL
#define NEVER (~0UL)

/* ---- machine primitives ---------------------------------------------- */

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

static inline void compiler_barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

/* a * b / c with a 128-bit intermediate (no libgcc); saturates. */
static u64 muldiv(u64 a, u64 b, u64 c)
{
	u64 lo, hi, q, r;
	if (c == 0)
		return 0;
	__asm__("mulq %3" : "=a"(lo), "=d"(hi) : "a"(a), "rm"(b));
	if (hi >= c)
		return NEVER;
	__asm__("divq %4" : "=a"(q), "=d"(r) : "a"(lo), "d"(hi), "rm"(c));
	(void)r;
	return q;
}

/* Saturating helpers for TSC deadlines: NEVER means "no deadline". */
static u64 add_sat(u64 a, u64 b)
{
	return a + b < a ? NEVER : a + b;
}

/* s seconds in TSC ticks; 0 seconds = NEVER (the option is off). */
static u64 ticks(u64 s, u64 hz)
{
	return s == 0 || s > NEVER / hz ? NEVER : s * hz;
}

/* gcc may emit calls to these even in freestanding code. */
void *memset(void *d, int c, unsigned long n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

/* ---- shared state (in guest memory, so a checkpoint carries it) -------- */

struct fail {
	u64 page, gpa, want_gen, got_gen, word, got, expected;
	const char *reason;
};

struct percpu {
	volatile u64 counter; /* the count workload's counter */
	u64 cycles;           /* TSC cycles the workload took */
	u64 written;          /* pages stamped */
	u64 verified;         /* pages checked good in the last verify */
	u64 bad;              /* pages checked bad in the last verify */
	struct fail first;    /* first bad page of the last verify */
} __attribute__((aligned(128)));

static struct percpu pcpu[MAX_VCPUS];
static volatile u32 print_lock;
static volatile u32 bar_count;
static volatile u32 bar_sense;

struct env {
	u32 me, n;
	u64 hz; /* TSC ticks per second (assumed 1 GHz if evm did not know) */
	u64 ram_end, free_start;
	const char *cmdline;
	u32 sense; /* this vCPU's barrier sense */
};

static void barrier(struct env *e)
{
	u32 s = !e->sense;
	e->sense = s;
	if (__atomic_add_fetch(&bar_count, 1, __ATOMIC_ACQ_REL) == e->n) {
		bar_count = 0;
		__atomic_store_n(&bar_sense, s, __ATOMIC_RELEASE);
	} else {
		while (__atomic_load_n(&bar_sense, __ATOMIC_ACQUIRE) != s)
			cpu_relax();
	}
}

/* ---- output lines ------------------------------------------------------ */

struct line {
	u32 n;
	char b[256];
};

static void put(struct line *l, char c)
{
	if (l->n < sizeof(l->b) - 1)
		l->b[l->n++] = c;
}

static void ls(struct line *l, const char *s)
{
	while (*s)
		put(l, *s++);
}

static void lu(struct line *l, u64 v)
{
	char t[20];
	int k = 0;
	do {
		t[k++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (k)
		put(l, t[--k]);
}

static void lx(struct line *l, u64 v)
{
	int shift = 60;
	ls(l, "0x");
	while (shift > 0 && (v >> shift) == 0)
		shift -= 4;
	for (; shift >= 0; shift -= 4)
		put(l, "0123456789abcdef"[(v >> shift) & 15]);
}

/* v / 1000 with three decimals */
static void lmilli(struct line *l, u64 v)
{
	lu(l, v / 1000);
	put(l, '.');
	put(l, (char)('0' + v / 100 % 10));
	put(l, (char)('0' + v / 10 % 10));
	put(l, (char)('0' + v % 10));
}

static void emit(struct line *l)
{
	l->b[l->n++] = '\n';
	while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
		while (print_lock)
			cpu_relax();
	for (u32 i = 0; i < l->n; i++)
		outb(COM1_THR, (u8)l->b[i]);
	__atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
	l->n = 0;
}

static void say(const char *s)
{
	struct line l = {0};
	ls(&l, s);
	emit(&l);
}

static __attribute__((noreturn)) void idle(void)
{
	for (;;)
		cpu_relax();
}

/* As Linux's ACPICA does after writing S5: poll the sleep status register
 * for a wake that never comes (an exit per read, should the VMM let this
 * vCPU run on after the power-off). */
static __attribute__((noreturn)) void poweroff(void)
{
	outb(PM1_CNT, PM1_POWEROFF);
	while (!(inb(SLEEP_STATUS) & WAKE_STATUS))
		;
	idle();
}

/* ---- command line ------------------------------------------------------ */

struct opts {
	u64 count, dirty, rate, seconds, passes, verify_every, report;
	int have_count, have_dirty;
};

static int word_is(const char *w, u32 len, const char *key)
{
	u32 i = 0;
	for (; i < len && key[i]; i++)
		if (w[i] != key[i])
			return 0;
	return i == len && key[i] == 0;
}

static int parse_u64(const char *s, u32 len, u64 *out)
{
	u64 v = 0;
	if (len == 0)
		return 0;
	for (u32 i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return 0;
		u64 d = (u64)(s[i] - '0');
		if (v > (NEVER - d) / 10)
			return 0;
		v = v * 10 + d;
	}
	*out = v;
	return 1;
}

/* Returns 0 on success, or fills `err` and returns -1. */
static int parse_opts(const char *c, struct opts *o, struct line *err)
{
	*o = (struct opts){.report = 1};
	while (*c) {
		while (*c == ' ' || *c == '\t' || *c == '\n')
			c++;
		if (!*c)
			break;
		const char *w = c;
		u32 len = 0, eq = 0;
		while (w[len] && w[len] != ' ' && w[len] != '\t' && w[len] != '\n') {
			if (w[len] == '=' && !eq)
				eq = len;
			len++;
		}
		c = w + len;
		u64 v = 0;
		if (!eq || !parse_u64(w + eq + 1, len - eq - 1, &v)) {
			ls(err, "PROBE ERROR bad option '");
			for (u32 i = 0; i < len && i < 64; i++)
				put(err, w[i]);
			ls(err, "': expected key=<decimal>");
			return -1;
		}
		if (word_is(w, eq, "count"))
			o->count = v, o->have_count = 1;
		else if (word_is(w, eq, "dirty"))
			o->dirty = v, o->have_dirty = 1;
		else if (word_is(w, eq, "rate"))
			o->rate = v;
		else if (word_is(w, eq, "seconds"))
			o->seconds = v;
		else if (word_is(w, eq, "passes"))
			o->passes = v;
		else if (word_is(w, eq, "verify_every"))
			o->verify_every = v;
		else if (word_is(w, eq, "report"))
			o->report = v;
		else {
			ls(err, "PROBE ERROR unknown option '");
			for (u32 i = 0; i < eq && i < 64; i++)
				put(err, w[i]);
			ls(err, "' (known: count dirty rate seconds passes verify_every report)");
			return -1;
		}
	}
	if (o->have_count && o->have_dirty) {
		ls(err, "PROBE ERROR count= and dirty= cannot be combined");
		return -1;
	}
	if (o->have_dirty && o->dirty == 0) {
		ls(err, "PROBE ERROR dirty=0: the buffer must be at least 1 MiB");
		return -1;
	}
	return 0;
}

/* ---- count workload ---------------------------------------------------- */

static void run_count(struct env *e, const struct opts *o)
{
	struct percpu *me = &pcpu[e->me];
	u64 report = ticks(o->report, e->hz);
	u64 t0 = rdtsc(), next = add_sat(t0, report);
	u64 done = 0;

	me->counter = 0;
	while (done < o->count) {
		u64 chunk = o->count - done;
		if (chunk > (1UL << 20))
			chunk = 1UL << 20;
		for (u64 j = 0; j < chunk; j++)
			me->counter++;
		done += chunk;
		u64 now = rdtsc();
		if (now >= next) {
			struct line l = {0};
			ls(&l, "PROBE count vcpu=");
			lu(&l, e->me);
			ls(&l, " at=");
			lu(&l, me->counter);
			emit(&l);
			next = add_sat(now, report);
		}
	}
	me->cycles = rdtsc() - t0;
	barrier(e);
	if (e->me != 0)
		idle();

	int ok = 1;
	for (u32 i = 0; i < e->n; i++) {
		struct line l = {0};
		ls(&l, "PROBE count vcpu=");
		lu(&l, i);
		ls(&l, " done=");
		lu(&l, pcpu[i].counter);
		ls(&l, " ns_per_iter=");
		/* picoseconds per iteration, printed as ns with 3 decimals */
		lmilli(&l, o->count ? muldiv(pcpu[i].cycles, 1000000000UL,
					     e->hz / 1000 * o->count)
				    : 0);
		emit(&l);
		ok &= pcpu[i].counter == o->count;
	}
	struct line l = {0};
	ls(&l, ok ? "PROBE COUNT OK vcpus=" : "PROBE COUNT FAIL vcpus=");
	lu(&l, e->n);
	ls(&l, " count=");
	lu(&l, o->count);
	emit(&l);
	say("PROBE DONE");
	poweroff();
}

/* ---- dirty workload: stamped pages ------------------------------------ *
 * Page i at generation g (g >= 1), as 512 little-endian u64 words:
 *   w[0] = PAGE_MAGIC, w[1] = i, w[2] = g, w[3] = checksum,
 *   w[j] = seed(i, g) + j * GOLDEN for j = 4..511,
 *   checksum = ~sum(w[j] ^ j for every j != 3).
 * The generation table (u32 per page) lives before the buffer; a page is
 * stamped first and its table entry updated after, by the one vCPU that
 * owns the page's slice. Table entry 0 = never written (not checked). */

static u64 seed(u64 i, u64 g)
{
	u64 x = (i * GOLDEN) ^ (g * 0xc2b2ae3d27d4eb4fUL) ^ PAGE_MAGIC;
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9UL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebUL;
	return x ^ (x >> 31);
}

static void stamp(u64 *p, u64 i, u64 g)
{
	u64 v = seed(i, g) + 4 * GOLDEN;
	u64 sum = (PAGE_MAGIC ^ 0) + (i ^ 1) + (g ^ 2);
	for (u64 j = 4; j < 512; j++, v += GOLDEN) {
		p[j] = v;
		sum += v ^ j;
	}
	p[0] = PAGE_MAGIC;
	p[1] = i;
	p[2] = g;
	p[3] = ~sum;
}

/* 1 if good; 0 and *f filled if bad. */
static int check(const volatile u64 *p, u64 i, u64 g, struct fail *f)
{
	*f = (struct fail){.page = i, .gpa = (u64)p, .want_gen = g, .got_gen = p[2]};
	if (p[0] != PAGE_MAGIC) {
		f->reason = "magic", f->got = p[0], f->expected = PAGE_MAGIC;
		return 0;
	}
	if (p[1] != i) {
		f->reason = "index", f->word = 1, f->got = p[1], f->expected = i;
		return 0;
	}
	if (p[2] != g) {
		f->reason = p[2] < g ? "stale" : "ahead";
		f->word = 2, f->got = p[2], f->expected = g;
		return 0;
	}
	u64 v = seed(i, g) + 4 * GOLDEN;
	u64 sum = (p[0] ^ 0) + (p[1] ^ 1) + (p[2] ^ 2);
	for (u64 j = 4; j < 512; j++, v += GOLDEN) {
		u64 w = p[j];
		if (w != v) {
			f->reason = "torn", f->word = j, f->got = w, f->expected = v;
			return 0;
		}
		sum += w ^ j;
	}
	if (p[3] != ~sum) {
		f->reason = "checksum", f->word = 3, f->got = p[3], f->expected = ~sum;
		return 0;
	}
	return 1;
}

struct dirty {
	volatile u32 *table;
	u8 *buf;
	u64 pages, lo, hi;
};

/* Verify this vCPU's slice into pcpu[me]; returns 1 if all good. */
static int verify_slice(struct env *e, const struct dirty *d)
{
	struct percpu *me = &pcpu[e->me];
	struct fail f;
	me->verified = me->bad = 0;
	for (u64 i = d->lo; i < d->hi; i++) {
		u64 g = d->table[i];
		if (g == 0)
			continue;
		if (check((const volatile u64 *)(d->buf + i * PAGE), i, g, &f)) {
			me->verified++;
		} else {
			if (me->bad++ == 0)
				me->first = f;
		}
	}
	return me->bad == 0;
}

static void print_fail(const struct fail *f, u64 bad, u32 vcpu)
{
	struct line l = {0};
	ls(&l, "PROBE VERIFY FAIL page=");
	lu(&l, f->page);
	ls(&l, " vcpu=");
	lu(&l, vcpu);
	ls(&l, " gpa=");
	lx(&l, f->gpa);
	ls(&l, " reason=");
	ls(&l, f->reason);
	ls(&l, " want_gen=");
	lu(&l, f->want_gen);
	ls(&l, " got_gen=");
	lu(&l, f->got_gen);
	ls(&l, " word=");
	lu(&l, f->word);
	ls(&l, " got=");
	lx(&l, f->got);
	ls(&l, " expected=");
	lx(&l, f->expected);
	ls(&l, " bad_pages=");
	lu(&l, bad);
	emit(&l);
}

/* Verifies this vCPU's slice and prints the result (powers off on failure);
 * returns when the next periodic verify is due. */
static u64 periodic_verify(struct env *e, const struct dirty *d, u64 vevery)
{
	struct percpu *me = &pcpu[e->me];
	if (!verify_slice(e, d)) {
		print_fail(&me->first, me->bad, e->me);
		poweroff();
	}
	struct line l = {0};
	ls(&l, "PROBE VERIFY OK pages=");
	lu(&l, me->verified);
	ls(&l, " vcpu=");
	lu(&l, e->me);
	emit(&l);
	return add_sat(rdtsc(), vevery);
}

static void run_dirty(struct env *e, const struct opts *o)
{
	struct percpu *me = &pcpu[e->me];
	struct dirty d;
	u64 table = (e->free_start + PAGE - 1) & ~(PAGE - 1);
	d.pages = o->dirty * (MIB / PAGE);
	u64 buf = (table + d.pages * 4 + 2 * MIB - 1) & ~(2 * MIB - 1);
	if (o->dirty > (1UL << 30) || buf + d.pages * PAGE > e->ram_end ||
	    buf + d.pages * PAGE < buf) {
		if (e->me == 0) {
			struct line l = {0};
			ls(&l, "PROBE ERROR dirty=");
			lu(&l, o->dirty);
			ls(&l, " MiB does not fit in guest memory (free ");
			lu(&l, (e->ram_end - e->free_start) / MIB);
			ls(&l, " MiB, the table and alignment need some)");
			emit(&l);
			poweroff();
		}
		idle();
	}
	d.table = (volatile u32 *)table;
	d.buf = (u8 *)buf;
	d.lo = d.pages * e->me / e->n;
	d.hi = d.pages * (e->me + 1) / e->n;
	if (e->me == 0) {
		struct line l = {0};
		ls(&l, "PROBE dirty table=");
		lx(&l, table);
		ls(&l, " buf=");
		lx(&l, buf);
		ls(&l, " pages=");
		lu(&l, d.pages);
		emit(&l);
	}

	/* pacing: one page every tsc_per_page = hz * PAGE / rate_b ticks */
	u64 rate_b = o->rate * MIB / e->n;
	if (o->rate && rate_b == 0)
		rate_b = 1;
	u64 cpp = rate_b ? e->hz * PAGE / rate_b : 0;
	u64 cpp_rem = rate_b ? e->hz * PAGE % rate_b : 0, acc = 0;

	u64 start = rdtsc();
	u64 end = add_sat(start, ticks(o->seconds, e->hz));
	u64 report = ticks(o->report, e->hz);
	u64 next_report = add_sat(start, report);
	u64 vevery = ticks(o->verify_every, e->hz);
	u64 next_verify = add_sat(start, vevery);
	u64 pace = start, since = start, since_pages = 0, passes = 0, gen = 0;

	me->written = 0;
	for (;;) {
		for (u64 i = d.lo; i < d.hi; i++) {
			u64 now = rdtsc();
			if (now >= end)
				goto out;
			if (rate_b) {
				if ((i64)(now - pace) > (i64)(e->hz / 10))
					pace = now; /* fell far behind: no burst */
				while ((i64)(rdtsc() - pace) < 0)
					cpu_relax();
				pace += cpp;
				acc += cpp_rem;
				if (acc >= rate_b)
					acc -= rate_b, pace++;
			}
			gen = d.table[i] + 1;
			stamp((u64 *)(d.buf + i * PAGE), i, gen);
			compiler_barrier();
			d.table[i] = (u32)gen;
			me->written++;
			since_pages++;
			if (now >= next_report) {
				struct line l = {0};
				ls(&l, "PROBE dirty vcpu=");
				lu(&l, e->me);
				ls(&l, " gen=");
				lu(&l, gen);
				ls(&l, " rate=");
				lu(&l, muldiv(since_pages, e->hz, (now - since) * (MIB / PAGE)));
				emit(&l);
				since = now, since_pages = 0;
				next_report = add_sat(now, report);
			}
			if (now >= next_verify)
				next_verify = periodic_verify(e, &d, vevery);
		}
		if (o->passes && ++passes >= o->passes)
			break;
		if (d.lo == d.hi) /* empty slice: nothing to do but wait for the end */
			while (rdtsc() < end)
				cpu_relax();
	}
	/* passes done: hold the pages still, verifying, until `seconds` end */
	me->cycles = rdtsc() - start;
	if (o->passes && o->seconds) {
		struct line l = {0};
		ls(&l, "PROBE dirty vcpu=");
		lu(&l, e->me);
		ls(&l, " finished passes=");
		lu(&l, passes);
		emit(&l);
		for (u64 now = rdtsc(); now < end; now = rdtsc()) {
			if (now >= next_verify)
				next_verify = periodic_verify(e, &d, vevery);
			cpu_relax();
		}
	}
	goto held;
out:
	me->cycles = rdtsc() - start;
held:
	barrier(e);
	verify_slice(e, &d);
	barrier(e);
	if (e->me != 0)
		idle();

	u64 written = 0, verified = 0, bad = 0, cycles = 0;
	u32 first = MAX_VCPUS;
	for (u32 i = 0; i < e->n; i++) {
		written += pcpu[i].written;
		verified += pcpu[i].verified;
		bad += pcpu[i].bad;
		if (pcpu[i].cycles > cycles)
			cycles = pcpu[i].cycles;
		if (pcpu[i].bad && first == MAX_VCPUS)
			first = i;
	}
	struct line l = {0};
	ls(&l, "PROBE DIRTY DONE vcpus=");
	lu(&l, e->n);
	ls(&l, " pages=");
	lu(&l, d.pages);
	ls(&l, " written=");
	lu(&l, written);
	ls(&l, " pages_per_s=");
	lu(&l, muldiv(written, e->hz, cycles));
	ls(&l, " mib_per_s=");
	lu(&l, muldiv(written, e->hz, cycles * (MIB / PAGE)));
	emit(&l);
	if (bad) {
		print_fail(&pcpu[first].first, bad, first);
	} else {
		ls(&l, "PROBE VERIFY OK pages=");
		lu(&l, verified);
		emit(&l);
	}
	say("PROBE DONE");
	poweroff();
}

/* ---- entry ------------------------------------------------------------- */

void __attribute__((noreturn)) probe_main(u64 index, u64 count, const char *cmdline,
					  u64 tsc_khz, u64 ram_end, u64 free_start);

void probe_main(u64 index, u64 count, const char *cmdline, u64 tsc_khz, u64 ram_end,
		u64 free_start)
{
	struct env e = {
		.me = (u32)index,
		.n = (u32)count,
		.hz = (tsc_khz ? tsc_khz : 1000000) * 1000,
		.ram_end = ram_end,
		.free_start = free_start,
		.cmdline = cmdline,
	};
	if (count == 0 || count > MAX_VCPUS || index >= count)
		idle();

	struct opts o;
	struct line err = {0};
	int bad = parse_opts(cmdline, &o, &err);

	if (e.me == 0) {
		struct line l = {0};
		ls(&l, "PROBE READY vcpus=");
		lu(&l, count);
		ls(&l, " tsc_khz=");
		lu(&l, tsc_khz);
		emit(&l);
		if (bad) {
			emit(&err);
			poweroff();
		}
		if (tsc_khz == 0)
			say("PROBE WARN tsc_khz=0: timing assumes a 1 GHz TSC");
		ls(&l, "PROBE start cmdline=\"");
		for (const char *c = cmdline; *c && l.n < 200; c++)
			put(&l, *c);
		ls(&l, "\" ram_end=");
		lx(&l, ram_end);
		ls(&l, " free=");
		lx(&l, free_start);
		emit(&l);
	}
	if (bad)
		idle();
	barrier(&e);

	if (o.have_dirty)
		run_dirty(&e, &o);
	if (!o.have_count)
		o.count = 10000000;
	run_count(&e, &o);
	idle();
}
