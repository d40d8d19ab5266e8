#!/usr/bin/env python3
"""Migration benchmark: real QEMU 7.2 TCG guests over a shaped link, QEMU's
own modes against rdma-x. Driven by scripts/bench and scripts/demo.

For every cell (workload x contender x repetition) it boots a fresh source
guest running tests/guest/workload.c and a destination waiting for the
stream, in two network namespaces joined by a veth shaped with tbf
(scripts/lib/netns.sh), migrates with one contender, and measures:

  total / downtime / setup  query-migrate's total-time, downtime, setup-time
  wire bytes                tx_bytes of the source veth (src -> dst), and of
                            the destination veth (return path, acks); QEMU's
                            own counters are not wire bytes (multifd+zstd)
  CPU seconds               per side: QEMU without its vCPU thread (the
                            migration work), the vCPU thread (the guest),
                            and QEMU's exec: children (sh + rdma-x), from
                            /proc/PID/stat and /proc/PID/task/*/stat before
                            and after; reaped children through cutime/cstime
  converged                 status 'completed' before the time cap (else
                            migrate_cancel)
  verified                  the destination guest runs and its workload
                            reports verify_bad=0, no VERIFY-FAIL, for a few
                            seconds after the switch-over

Contenders (all with return-path on, max-bandwidth 10e9, downtime-limit
300 ms, the same guest, workload and link):
  plain         QEMU tcp:
  xbzrle        QEMU tcp: + xbzrle, xbzrle-cache-size = rdma-x's page cache
                total (lanes x --cache-size)
  multifd-zstd  QEMU multifd, 2 channels, zstd level 1
  multifd       QEMU multifd, 2 channels, no compression (only on request)
  rdma-x        QEMU exec:rdma-x send / exec:rdma-x recv, send in the source
                namespace, recv in the destination one
  rdma-x-multifd  QEMU multifd, 2 channels, compression none, through the
                unix front end: rdma-x send --listen-unix in the source
                namespace, rdma-x recv --connect-unix in the destination one
                (not QEMU's children: their CPU is sampled by pid)

Output: a JSON file of every run plus medians, a Markdown report, a PNG plot.
Python 3 standard library, plus matplotlib for the plot (or gnuplot).
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.abspath(os.path.join(HERE, '..', '..', '..'))
sys.path.insert(0, os.path.join(TOP, 'tests', 'e2e', 'lib'))
import qmp as Q  # noqa: E402

NETNS = os.path.join(TOP, 'scripts', 'lib', 'netns.sh')
SRC_IP, DST_IP = '10.200.0.1', '10.200.0.2'
CLK = os.sysconf('SC_CLK_TCK')

CONTENDERS = ['plain', 'xbzrle', 'multifd-zstd', 'rdma-x', 'rdma-x-multifd', 'multifd']
# QEMU multifd without compression: only with --contenders (a reference for rdma-x-multifd)
DEFAULT_CONTENDERS = CONTENDERS[:-1]
RDMAX_CONTENDERS = ('rdma-x', 'rdma-x-multifd')
CONTENDER_LABEL = {'plain': 'QEMU plain', 'xbzrle': 'QEMU xbzrle',
                   'multifd-zstd': 'QEMU multifd+zstd', 'rdma-x': 'rdma-x',
                   'rdma-x-multifd': 'rdma-x unix multifd', 'multifd': 'QEMU multifd'}
QEMU_MODES = [c for c in CONTENDERS if c not in RDMAX_CONTENDERS]

# name -> (workload mode, MB/s). The names are the report's rows.
WORKLOADS = {
    'idle': ('idle', 0),
    'sparse-random@50': ('sparse-random', 50),
    'sparse-random@100': ('sparse-random', 100),
    'sparse-real@50': ('sparse-real', 50),
    'sparse-real@100': ('sparse-real', 100),
    'page-real@50': ('page-real', 50),
    'page-real@100': ('page-real', 100),
    'page-random@50': ('page-random', 50),
    'page-random@100': ('page-random', 100),
}
WL_LABEL = {
    'idle': 'idle (real content, no writes)',
    'sparse-random': 'sparse writes, random memory',
    'sparse-real': 'sparse writes, real content',
    'page-real': 'whole-page rewrites, real content',
    'page-random': 'whole-page random rewrites',
}

PRESETS = {
    # name: defaults that the command line may override
    'full': dict(workloads=list(WORKLOADS), contenders=DEFAULT_CONTENDERS, reps=3,
                 mem=Q.BIG_MEM, mib=512, cap=60, verify_s=3),
    'quick': dict(workloads=list(WORKLOADS), contenders=DEFAULT_CONTENDERS, reps=1,
                  mem=Q.BIG_MEM, mib=512, cap=60, verify_s=3),
    'demo': dict(workloads=['sparse-real@100'],
                 contenders=['plain', 'xbzrle', 'multifd-zstd', 'rdma-x'], reps=1,
                 mem=Q.BIG_MEM, mib=512, cap=50, verify_s=2),
    'smoke': dict(workloads=['sparse-random@30'], contenders=['plain', 'rdma-x'],
                  reps=1, mem=Q.SMALL_MEM, mib=64, cap=40, verify_s=3),
}


def log(*a):
    Q.log(*a)


# ------------------------------------------------------------ /proc probes

def proc_stat(pid):
    """(utime+stime, cutime+cstime) of pid in seconds, or None."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            s = f.read()
    except OSError:
        return None
    f = s[s.rindex(')') + 2:].split()
    # fields after ')' start at 3 (state): utime=14 stime=15 cutime=16 cstime=17
    return ((int(f[11]) + int(f[12])) / CLK, (int(f[13]) + int(f[14])) / CLK)


def thread_cpu(pid, name_prefix):
    """CPU seconds of pid's threads whose comm starts with name_prefix."""
    total = 0.0
    try:
        tids = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return 0.0
    for t in tids:
        try:
            with open('/proc/%d/task/%s/stat' % (pid, t)) as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index('(') + 1:s.rindex(')')]
        if comm.startswith(name_prefix):
            f = s[s.rindex(')') + 2:].split()
            total += (int(f[11]) + int(f[12])) / CLK
    return total


def machine_cpu():
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / CLK, sum(v[:8]) / CLK


def loadavg():
    with open('/proc/loadavg') as f:
        return float(f.read().split()[0])


def netdev_bytes(pid, dev):
    """(rx, tx) bytes of dev as seen from pid's network namespace."""
    with open('/proc/%d/net/dev' % pid) as f:
        for line in f:
            if line.strip().startswith(dev + ':'):
                v = line.split(':', 1)[1].split()
                return int(v[0]), int(v[8])
    raise Q.TestFailure('no %s in netns of pid %d' % (dev, pid))


def listening_in(pid, port):
    for table in ('tcp', 'tcp6'):
        try:
            with open('/proc/%d/net/%s' % (pid, table)) as f:
                next(f)
                for line in f:
                    p = line.split()
                    if p[3] == '0A' and int(p[1].rsplit(':', 1)[1], 16) == port:
                        return True
        except OSError:
            pass
    return False


# ------------------------------------------------------------ the link

class Link:
    def __init__(self, rate):
        self.rate = rate
        self.name = 'rxb%d' % (os.getpid() % 100000)
        self.src_ns, self.dst_ns = self.name + '-src', self.name + '-dst'
        self.src_dev, self.dst_dev = self.name + '-s', self.name + '-d'
        self.up = False

    def __enter__(self):
        subprocess.run([NETNS, 'up', self.name, self.rate], check=True)
        self.up = True
        # One idle process per namespace: its /proc/PID/net/dev shows the
        # veth counters even after a QEMU exits (a failed incoming does)
        self.watch = {}
        for ns in (self.src_ns, self.dst_ns):
            self.watch[ns] = subprocess.Popen(
                ['ip', 'netns', 'exec', ns, 'sleep', 'infinity'],
                stdin=subprocess.DEVNULL)
        log('link: %s <-> %s, tbf %s (src->dst)' % (self.src_ns, self.dst_ns,
                                                   self.rate))
        return self

    def counters(self):
        """(source veth tx, destination veth tx) bytes."""
        return (netdev_bytes(self.watch[self.src_ns].pid, self.src_dev)[1],
                netdev_bytes(self.watch[self.dst_ns].pid, self.dst_dev)[1])

    def close(self):
        for p in getattr(self, 'watch', {}).values():
            p.kill()
            p.wait()
        if self.up:
            subprocess.run([NETNS, 'down', self.name])
            self.up = False

    def __exit__(self, *exc):
        self.close()
        return False


# ------------------------------------------------------------ one run

class Sampler:
    """Last seen own CPU of every descendant of a QEMU (its exec: children
    exit at the end of the migration, so sample them while they live)."""

    def __init__(self, pid, rdmax):
        self.pid = pid
        self.rdmax = rdmax
        self.cpu = {}
        self.kind = {}
        self.extra = []   # processes of this side that are not QEMU's children

    def poll(self):
        for p in Q.descendants(self.pid) + self.extra:
            st = proc_stat(p)
            if st is None:
                continue
            self.cpu[p] = st[0]
            # every time: the fork of `sh -c` is 'sh' until it execs rdma-x
            if True:
                argv = Q.cmdline(p).split()
                self.kind[p] = ('rdma-x' if argv and self.rdmax and
                                argv[0] == self.rdmax else
                                os.path.basename(argv[0]) if argv else '?')

    def total(self, kind=None):
        return sum(v for p, v in self.cpu.items()
                   if kind is None or self.kind.get(p) == kind)


class Snapshot:
    def __init__(self, guest):
        pid = guest.proc.pid
        st = proc_stat(pid) if guest.alive() else None
        self.alive = st is not None
        self.own, self.children = st or (0.0, 0.0)
        self.vcpu = thread_cpu(pid, 'CPU ')


def contender_setup(contender, args):
    caps = {'return-path': True}
    params = {'max-bandwidth': 10_000_000_000, 'downtime-limit': 300}
    if contender == 'xbzrle':
        caps['xbzrle'] = True
        params['xbzrle-cache-size'] = args.cache_total
    elif contender == 'multifd-zstd':
        caps['multifd'] = True
        params.update({'multifd-channels': 2, 'multifd-compression': 'zstd',
                       'multifd-zstd-level': 1})
    elif contender in ('rdma-x-multifd', 'multifd'):
        caps['multifd'] = True
        params.update({'multifd-channels': 2, 'multifd-compression': 'none'})
    return caps, params


def rdmax_uris(rig, args, port):
    q = Q.sh_quote
    common = '--lanes %d' % args.lanes
    send = ('%s send --to %s:%d %s --cache-size %d %s --stats-json %s 2>%s' % (
        q(args.rdmax), DST_IP, port, common, args.cache_total // args.lanes,
        args.send_args,
        q(rig.path('send.json')), q(rig.path('send.err'))))
    send = 'exec:%s; echo $? >%s' % (send, q(rig.path('send.rc')))
    recv = ('%s recv --listen %s:%d %s --stats-json %s 2>%s' % (
        q(args.rdmax), DST_IP, port, common, q(rig.path('recv.json')),
        q(rig.path('recv.err'))))
    recv = 'exec:{ %s; echo $? >%s; }' % (recv, q(rig.path('recv.rc')))
    return send, recv


def start_unix_pair(rig, args, link, port):
    """rdma-x recv (destination namespace, to the destination QEMU's unix
    socket) and send (source namespace, listening for the source QEMU),
    started by hand as a management layer would: not QEMU's children."""
    rx = rig.spawn(['ip', 'netns', 'exec', link.dst_ns, args.rdmax, 'recv',
                    '--listen', '%s:%d' % (DST_IP, port),
                    '--connect-unix', rig.path('qemu-dst.sock'),
                    '--lanes', str(args.lanes),
                    '--stats-json', rig.path('recv.json')], 'recv.err')
    Q.wait_for(lambda: listening_in(rx.pid, port), 15, 'rdma-x recv to listen')
    tx = rig.spawn(['ip', 'netns', 'exec', link.src_ns, args.rdmax, 'send',
                    '--listen-unix', rig.path('send.sock'),
                    '--to', '%s:%d' % (DST_IP, port), '--lanes', str(args.lanes),
                    '--cache-size', str(args.cache_total // args.lanes)] +
                   args.send_args.split() +
                   ['--stats-json', rig.path('send.json')], 'send.err')
    Q.wait_for(lambda: os.path.exists(rig.path('send.sock')), 15,
               'rdma-x send socket')
    return tx, rx


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_rc(path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                s = f.read().strip()
            if s:
                return int(s)
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return None


def run_one(args, link, wl_name, contender, rep, port):
    mode, rate = parse_workload(wl_name)
    workload = {'mode': mode, 'mib': args.mib, 'rate': rate, 'report': 0.5,
                'verify': 1}
    r = dict(workload=wl_name, mode=mode, rate=rate, contender=contender,
             rep=rep, converged=False, verified=False, ok=False, error=None)
    t_cell = time.monotonic()
    rig = Q.Rig('bench-%s-%s' % (wl_name.replace('@', '-'), contender),
                args.rdmax)
    try:
        dst = rig.guest('dst', workload=workload, mem=args.mem,
                        incoming='defer',
                        wrapper=('ip', 'netns', 'exec', link.dst_ns),
                        extra_args=('-name', 'dst,debug-threads=on'))
        src = rig.guest('src', workload=workload, mem=args.mem,
                        wrapper=('ip', 'netns', 'exec', link.src_ns),
                        extra_args=('-name', 'src,debug-threads=on'))
        src.wait_serial('WORKLOAD-READY', timeout=120)
        src.wait_reports(3, timeout=60)
        caps, params = contender_setup(contender, args)
        for g in (src, dst):
            Q.set_caps(g.qmp, caps)
            Q.set_params(g.qmp, params)
        unix_pair = None
        if contender == 'rdma-x':
            send_uri, recv_uri = rdmax_uris(rig, args, port)
        elif contender == 'rdma-x-multifd':
            send_uri = 'unix:' + rig.path('send.sock')
            recv_uri = 'unix:' + rig.path('qemu-dst.sock')
        else:
            send_uri = recv_uri = 'tcp:%s:%d' % (DST_IP, port)
        dst.qmp.cmd('migrate-incoming', uri=recv_uri)
        if contender == 'rdma-x-multifd':
            unix_pair = start_unix_pair(rig, args, link, port)
        else:
            Q.wait_for(lambda: listening_in(dst.proc.pid, port), 15,
                       'destination to listen on port %d' % port)

        ssamp, dsamp = Sampler(src.proc.pid, args.rdmax), \
            Sampler(dst.proc.pid, args.rdmax)
        if unix_pair:
            ssamp.extra, dsamp.extra = [unix_pair[0].pid], [unix_pair[1].pid]
        s0, d0 = Snapshot(src), Snapshot(dst)
        w0 = link.counters()
        m0 = machine_cpu()
        r['load_before'] = loadavg()
        t0 = time.monotonic()
        src.qmp.cmd('migrate', uri=send_uri)
        info, last_poll, st = {}, 0.0, 'none'
        while True:
            info = Q.query_migrate(src.qmp)
            st = info.get('status', 'none')
            if st == 'active':
                # QEMU's last view before the switch-over: why it stopped
                ram_a = info.get('ram', {})
                r['last_active'] = {
                    't_ms': round((time.monotonic() - t0) * 1000),
                    'expected_downtime_ms': info.get('expected-downtime'),
                    'mbps': ram_a.get('mbps'),
                    'remaining': ram_a.get('remaining'),
                    'dirty_pages_rate': ram_a.get('dirty-pages-rate'),
                    'dirty_sync_count': ram_a.get('dirty-sync-count')}
                # QEMU's bandwidth estimate over time: what its switch-over used
                r.setdefault('qemu_trace', []).append(
                    [r['last_active']['t_ms'], ram_a.get('mbps'), ram_a.get('remaining'),
                     ram_a.get('transferred'), ram_a.get('dirty-sync-count')])
            ssamp.poll()
            dsamp.poll()
            if st == 'completed' and not info.get('total-time'):
                # 7.2 sets 'completed' a moment before it computes the
                # times: ask again
                time.sleep(0.05)
                continue
            if st in ('completed', 'failed', 'cancelled'):
                break
            if time.monotonic() - t0 > args.cap:
                log('cap of %d s reached: migrate_cancel' % args.cap)
                r['capped'] = True
                try:
                    src.qmp.cmd('migrate_cancel')
                except Q.QMPError:
                    pass
                try:
                    info, _ = Q.wait_migration(src.qmp, 20,
                                               until=('cancelled', 'failed',
                                                      'completed'))
                except Q.TestFailure:
                    pass
                st = info.get('status', 'none')
                break
            time.sleep(0.1)
        r['wall_s'] = round(time.monotonic() - t0, 3)
        r['status'] = st
        r['converged'] = st == 'completed' and not r.get('capped')
        if st == 'failed' and not r.get('capped'):
            r['error'] = 'migration failed: %s' % info.get('error-desc', '')
        r['total_ms'] = info.get('total-time')
        r['downtime_ms'] = info.get('downtime')
        r['setup_ms'] = info.get('setup-time')
        ram = info.get('ram', {})
        r['qemu_transferred'] = ram.get('transferred')
        r['dirty_sync_count'] = ram.get('dirty-sync-count')
        r['qemu_mbps'] = ram.get('mbps')
        if 'xbzrle-cache' in info:
            x = info['xbzrle-cache']
            r['xbzrle'] = {k: x.get(k) for k in ('cache-size', 'bytes', 'pages',
                                                  'cache-miss', 'cache-miss-rate',
                                                  'encoding-rate', 'overflow')}

        # exec: children exit after the switch-over; let them, then measure
        if contender == 'rdma-x':
            r['send_rc'] = read_rc(rig.path('send.rc'), 20)
            r['recv_rc'] = read_rc(rig.path('recv.rc'), 20)
            ssamp.poll()
            dsamp.poll()
        elif unix_pair:
            for name, pr in zip(('send_rc', 'recv_rc'), unix_pair):
                deadline = time.monotonic() + 20
                while pr.poll() is None and time.monotonic() < deadline:
                    ssamp.poll()
                    dsamp.poll()
                    time.sleep(0.1)
                r[name] = pr.poll()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
                Q.descendants(src.proc.pid) or Q.descendants(dst.proc.pid)):
            ssamp.poll()
            dsamp.poll()
            time.sleep(0.1)
        s1, d1 = Snapshot(src), Snapshot(dst)
        w1 = link.counters()
        m1 = machine_cpu()
        r['load_after'] = loadavg()
        r['wire_bytes'] = w1[0] - w0[0]
        r['wire_back_bytes'] = w1[1] - w0[1]
        for side, a, b, samp in (('src', s0, s1, ssamp), ('dst', d0, d1, dsamp)):
            if not b.alive:
                # exited (a failed incoming migration ends QEMU): unknown
                r['%s_exited' % side] = True
                b = a
            kids = max(b.children - a.children, samp.total())
            r['%s_qemu_cpu' % side] = round(b.own - a.own - (b.vcpu - a.vcpu), 3)
            r['%s_vcpu_cpu' % side] = round(b.vcpu - a.vcpu, 3)
            r['%s_children_cpu' % side] = round(kids, 3)
            r['%s_rdmax_cpu' % side] = round(samp.total('rdma-x'), 3)
            r['%s_cpu' % side] = round(r['%s_qemu_cpu' % side] + kids, 3)
        ours = sum(r[k] for k in ('src_qemu_cpu', 'src_vcpu_cpu', 'dst_qemu_cpu',
                                  'dst_vcpu_cpu', 'src_children_cpu',
                                  'dst_children_cpu'))
        r['machine_busy_s'] = round(m1[0] - m0[0], 3)
        r['machine_s'] = round(m1[1] - m0[1], 3)
        r['others_cpu_s'] = round(max(0.0, r['machine_busy_s'] - ours), 3)
        if contender in RDMAX_CONTENDERS:
            r['send_stats'] = read_json(rig.path('send.json'))
            r['recv_stats'] = read_json(rig.path('recv.json'))
            r['send_err'] = rig.stderr_of('send')[-2000:]
            r['recv_err'] = rig.stderr_of('recv')[-2000:]
            if r['converged'] and (r['send_rc'] != 0 or r['recv_rc'] != 0):
                r['error'] = 'rdma-x exit status send %s recv %s' % (
                    r['send_rc'], r['recv_rc'])

        if r['converged']:
            verify_destination(r, src, dst, args)
        r['ok'] = r['converged'] and r['verified'] and not r['error']
        if not src.alive() or (r['converged'] and not dst.alive()):
            r['error'] = r['error'] or 'a QEMU exited'
    except (Q.TestFailure, Q.QMPError, OSError) as e:
        r['error'] = '%s: %s' % (type(e).__name__, e)
    finally:
        r['cell_s'] = round(time.monotonic() - t_cell, 1)
        if r['error'] or (r['converged'] and not r['verified']):
            r['logs'] = collect_logs(rig)
            rig.failed = True
        else:
            rig.failed = bool(os.environ.get('KEEP'))
        rig.close()
    log('%-18s %-13s rep %d: %s' % (wl_name, contender, rep, brief(r)))
    return r


def verify_destination(r, src, dst, args):
    """The destination guest runs and its workload finds every write for
    verify_s seconds (at least two reports) after the switch-over."""
    Q.wait_status(dst, ('running',), timeout=20)
    n0 = len(dst.reports())
    t_end = time.monotonic() + args.verify_s
    Q.wait_for(lambda: time.monotonic() > t_end and
               len(dst.reports()) >= n0 + 2, args.verify_s + 30,
               'destination workload reports')
    reps = dst.reports()
    fails = dst.verify_failures() + src.verify_failures()
    r['dst_reports'] = len(reps)
    r['dst_verify_checked'] = reps[-1]['checked'] if reps else 0
    r['dst_verify_bad'] = reps[-1]['bad'] if reps else None
    r['dst_state'] = dst.status()
    r['src_state'] = src.status()
    r['verified'] = (not fails and bool(reps) and reps[-1]['bad'] == 0)
    if not r['verified']:
        r['error'] = 'destination self-check failed: verify_bad=%s %s' % (
            r['dst_verify_bad'], '; '.join(fails[:3]))


def collect_logs(rig):
    out = {}
    for g in rig.guests:
        out[g.name + '_serial'] = '\n'.join(g.serial_text().splitlines()[-15:])
        out[g.name + '_qemu_err'] = g.qemu_stderr()[-2000:]
    for w in ('send', 'recv'):
        out[w + '_err'] = rig.stderr_of(w)[-2000:]
    out['dir'] = rig.dir
    return out


def brief(r):
    if r.get('error') and 'wall_s' not in r:
        return 'ERROR %s' % r['error']
    s = '%s total %s ms, downtime %s ms, wire %.0f MiB, cpu src %.1f dst %.1f s' % (
        'ok' if r['ok'] else ('NOT CONVERGED' if not r['converged'] else 'BAD'),
        r.get('total_ms') if r['converged'] else 'cap',
        r.get('downtime_ms'), (r.get('wire_bytes') or 0) / 2**20,
        r.get('src_cpu', 0), r.get('dst_cpu', 0))
    if r.get('error'):
        s += ' [%s]' % r['error']
    return s


def parse_workload(name):
    if name in WORKLOADS:
        return WORKLOADS[name]
    m = re.fullmatch(r'([a-z-]+)@(\d+(?:\.\d+)?)', name)
    if not m or m.group(1) not in WL_LABEL:
        raise SystemExit('bench: unknown workload %r (MODE@MBPS, MODE in %s)'
                         % (name, ', '.join(WL_LABEL)))
    return m.group(1), float(m.group(2)) if '.' in m.group(2) else int(m.group(2))


# ------------------------------------------------------------ summary

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs, workloads, contenders):
    cells = []
    for wl in workloads:
        for c in contenders:
            rs = [r for r in runs if r['workload'] == wl and r['contender'] == c]
            if not rs:
                continue
            conv = [r for r in rs if r['converged']]
            cell = dict(workload=wl, contender=c, runs=len(rs),
                        converged=len(conv),
                        verified=sum(1 for r in rs if r['verified']),
                        errors=[r['error'] for r in rs if r['error']])
            # medians over converged runs; a cell that mostly did not
            # converge has no time (it is ">cap")
            base = conv if len(conv) * 2 > len(rs) else []
            for k in ('total_ms', 'downtime_ms', 'setup_ms'):
                cell[k] = med([r.get(k) for r in base])
            for k in ('wire_bytes', 'wire_back_bytes', 'src_cpu', 'dst_cpu',
                      'src_qemu_cpu', 'dst_qemu_cpu', 'src_children_cpu',
                      'dst_children_cpu', 'src_vcpu_cpu', 'dst_vcpu_cpu',
                      'dirty_sync_count', 'others_cpu_s', 'load_before'):
                cell[k] = med([r.get(k) for r in (base or rs)])
            cell['samples_total_ms'] = [r.get('total_ms') if r['converged']
                                        else None for r in rs]
            cells.append(cell)
    return cells


def best_qemu(cells, wl):
    """QEMU's best mode for a workload: the converged one with the lowest
    median total time."""
    qs = [c for c in cells if c['workload'] == wl and c['contender'] in QEMU_MODES
          and c['total_ms'] is not None]
    return min(qs, key=lambda c: c['total_ms']) if qs else None


def targets(cells, workloads):
    """The issue's targets, checked against the medians."""
    out = []

    def cell(wl, c):
        for x in cells:
            if x['workload'] == wl and x['contender'] == c:
                return x
        return None

    for wl in workloads:
        mode, rate = parse_workload(wl)
        rx, best = cell(wl, 'rdma-x'), best_qemu(cells, wl)
        if rx is None or best is None:
            continue
        checks = []
        if rate not in (50, 100):
            continue    # the targets are stated for 50 and 100 MB/s
        if mode.startswith('sparse'):
            checks.append(('total time', 0.5, 'total_ms'))
        if mode == 'sparse-random' and rate == 100:
            checks[-1] = ('total time', 0.4, 'total_ms')
            checks.append(('downtime', 0.5, 'downtime_ms'))
        if mode == 'page-random':
            checks.append(('total time', 1.05, 'total_ms'))
        for what, limit, key in checks:
            ratio = None
            if rx[key] is not None and best[key]:
                ratio = rx[key] / best[key]
            out.append(dict(workload=wl, what=what, limit=limit,
                            best=best['contender'], best_value=best[key],
                            rdmax_value=rx[key], ratio=ratio,
                            met=ratio is not None and ratio <= limit))
    return out


# ------------------------------------------------------------ reports

def fmt_s(ms):
    return '—' if ms is None else '%.1f' % (ms / 1000.0)


def fmt(v, f='%.1f'):
    return '—' if v is None else f % v


def machine_info(args):
    info = {'host': platform.node(), 'kernel': platform.release(),
            'cores': os.cpu_count()}
    try:
        with open('/proc/cpuinfo') as f:
            m = re.search(r'model name\s*:\s*(.*)', f.read())
            info['cpu'] = m.group(1) if m else '?'
        with open('/proc/meminfo') as f:
            info['mem_gib'] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    # The QEMU each side runs (RDMAX_QEMU_SRC/_DST, e.g. scripts/qemu10), as lib/qmp.py picks it.
    for side in ('SRC', 'DST'):
        qemu = os.environ.get('RDMAX_QEMU_' + side) or Q.QEMU
        r = subprocess.run([qemu, '--version'], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
        info['qemu_' + side.lower()] = r.stdout.splitlines()[0] if r.stdout else '?'
    info['qemu'] = info['qemu_src'] if info['qemu_src'] == info['qemu_dst'] else \
        '%s -> %s' % (info['qemu_src'], info['qemu_dst'])
    r = subprocess.run(['git', '-C', TOP, 'describe', '--always', '--dirty'],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       text=True)
    info['rdmax_git'] = r.stdout.strip() or '?'
    info['rdmax_sha256'] = getattr(args, 'rdmax_sha256', None)
    try:
        info['rdmax_binary_mtime'] = datetime.datetime.utcfromtimestamp(
            os.stat(args.rdmax).st_mtime).strftime('%Y-%m-%d %H:%M:%S UTC')
    except OSError:
        pass
    return info


def config_of(args):
    return dict(link=args.link, guest_mem=args.mem, region_mib=args.mib,
                reps=args.reps, cap_s=args.cap, verify_s=args.verify_s,
                lanes=args.lanes, cache_per_lane=args.cache_total // args.lanes,
                cache_total=args.cache_total, send_args=args.send_args,
                xbzrle_cache_size=args.cache_total, downtime_limit_ms=300,
                max_bandwidth=10_000_000_000, multifd_channels=2,
                multifd_zstd_level=1, rdmax=args.rdmax,
                workloads=args.workloads, contenders=args.contenders)


def markdown(doc):
    cfg, mach, cells = doc['config'], doc['machine'], doc['summary']
    contenders = [c for c in CONTENDERS if c in cfg['contenders']]
    L = []
    L.append('# Migration benchmark: QEMU\'s own modes vs rdma-x')
    L.append('')
    L.append('Generated by `%s` on %s (%s wall). Do not edit: rerun the '
             'script.' % (doc['command'], doc['date'], doc['elapsed']))
    L.append('')
    L.append('**Machine:** %s, %s cores, %s GiB, Linux %s; %s; repository at run time %s; rdma-x '
             '(binary built %s, sha256 %s).' % (
                 mach.get('cpu'), mach.get('cores'), mach.get('mem_gib'),
                 mach.get('kernel'), mach.get('qemu'), mach.get('rdmax_git'),
                 mach.get('rdmax_binary_mtime', '?'),
                 (mach.get('rdmax_sha256') or '?')[:12]))
    L.append('')
    qv = re.search(r'version ([0-9.]+)', mach.get('qemu') or '')
    L.append('**Setup:** source and destination QEMU ' + (qv.group(1) if qv else '?') +
             ' (TCG, 1 vCPU, `-m %s`) '
             'in two network namespaces joined by a veth shaped with '
             '`tbf rate %s burst 1000000 latency 50ms` (source to destination). '
             'Guest workload: tests/guest/workload.c on a %d MiB region, '
             'verifying every write; the destination must keep verify_bad=0 '
             'for %d s after the switch-over. All contenders: return-path on, '
             'max-bandwidth 10e9, downtime-limit 300 ms; xbzrle-cache-size %d MiB '
             '(= rdma-x page cache total: %d lanes x %d MiB); multifd 2 channels, '
             'zstd level 1; rdma-x `exec:` with `--lanes %d --cache-size %d MiB%s`, '
             'send in the source namespace, recv in the destination one. A run '
             'not completed after %d s is cancelled and counts as not converged. '
             '%d repetition(s) per cell, medians shown; contenders interleaved '
             'within each repetition.' % (
                 cfg['guest_mem'], cfg['link'], cfg['region_mib'], cfg['verify_s'],
                 cfg['cache_total'] >> 20, cfg['lanes'],
                 cfg['cache_per_lane'] >> 20, cfg['lanes'],
                 cfg['cache_per_lane'] >> 20,
                 (' ' + cfg['send_args']) if cfg.get('send_args') else '',
                 cfg['cap_s'], cfg['reps']))
    L.append('')
    for m in doc.get('pooled_from') or []:
        L.append('Pooled: %d runs from `%s` of %s (rdma-x sha256 %s).' % (
            m['runs'], m['command'], m['date'], (m['rdmax_sha256'] or '?')[:12]))
        L.append('')
    for m in doc.get('merged_from') or []:
        L.append('Merged in: %d runs (%s) from `%s` of %s (rdma-x %s).' % (
            m['runs'], ', '.join(m['cells']) if len(m['cells']) < 6 else
            '%d cells' % len(m['cells']), m['command'], m['date'], m['rdmax_git']))
        L.append('')
    L.append('Columns: time = query-migrate total-time (s); down = downtime '
             '(ms); setup = setup-time (ms); wire = bytes on the veth, source '
             'to destination (MiB), not QEMU\'s counters; CPU = CPU seconds '
             'spent migrating on each side: QEMU minus its vCPU thread, plus its '
             '`exec:` children (sh, rdma-x); conv = converged runs / runs; '
             'ok = runs whose destination verified. x fastest = rdma-x time over '
             'that of the fastest QEMU mode for that workload in this run.')
    L.append('')
    L.append('| workload | MB/s | contender | time s | down ms | setup ms | '
             'wire MiB | src CPU s | dst CPU s | conv | ok | x fastest |')
    L.append('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for wl in cfg['workloads']:
        mode, rate = parse_workload(wl)
        best = best_qemu(cells, wl)
        for c in contenders:
            x = next((x for x in cells if x['workload'] == wl and
                      x['contender'] == c), None)
            if x is None:
                continue
            t = fmt_s(x['total_ms']) if x['total_ms'] is not None else \
                '>%d (n.c.)' % cfg['cap_s']
            ratio = ''
            if c in RDMAX_CONTENDERS and best and x['total_ms'] is not None:
                ratio = '%.2f' % (x['total_ms'] / best['total_ms'])
            elif c in RDMAX_CONTENDERS and best:
                ratio = 'n.c.'
            name = CONTENDER_LABEL[c]
            if best and best['contender'] == c:
                name += ' (fastest QEMU here)'
            if c in RDMAX_CONTENDERS:
                name = '**%s**' % CONTENDER_LABEL[c]
                t = '**%s**' % t
            L.append('| %s | %s | %s | %s | %s | %s | %s | %s | %s | %d/%d | %d/%d | %s |' % (
                WL_LABEL[mode], rate, name, t, fmt(x['downtime_ms'], '%.0f'),
                fmt(x['setup_ms'], '%.0f'),
                fmt(None if x['wire_bytes'] is None else x['wire_bytes'] / 2**20, '%.0f'),
                fmt(x['src_cpu']), fmt(x['dst_cpu']), x['converged'], x['runs'],
                x['verified'], x['runs'], ratio))
    L.append('')
    tg = doc.get('targets') or []
    if tg:
        L.append('## Targets')
        L.append('')
        L.append('| workload | target | fastest QEMU here | rdma-x | ratio | met |')
        L.append('|---|---|---|---|---|---|')
        for t in tg:
            unit = 's' if t['what'] == 'total time' else 'ms'
            conv = (lambda v: fmt_s(v)) if unit == 's' else (lambda v: fmt(v, '%.0f'))
            L.append('| %s | %s <= %.2fx | %s %s %s | %s %s | %s | %s |' % (
                t['workload'], t['what'], t['limit'], CONTENDER_LABEL[t['best']],
                conv(t['best_value']), unit, conv(t['rdmax_value']), unit,
                fmt(t['ratio'], '%.2f'), 'yes' if t['met'] else '**no**'))
        L.append('')
    L.append('## Noise')
    L.append('')
    n = doc['noise']
    L.append('Load average before runs: min %s, median %s, max %s. CPU used '
             'by other processes during the migrations (machine busy time '
             'minus the benchmark\'s own processes, both cores): median %s s, '
             'max %s s per run. The machine has %s cores and is shared; the '
             'guests are TCG, so the source vCPU alone needs most of a core.' % (
                 fmt(n['load_min'], '%.2f'), fmt(n['load_median'], '%.2f'),
                 fmt(n['load_max'], '%.2f'), fmt(n['others_median']),
                 fmt(n['others_max']), mach.get('cores')))
    if cfg['reps'] > 1:
        L.append('')
        L.append('Per-run total times (s), to judge the spread:')
        L.append('')
        for x in cells:
            L.append('- %s / %s: %s' % (x['workload'], x['contender'], ', '.join(
                'n.c.' if v is None else '%.1f' % (v / 1000)
                for v in x['samples_total_ms'])))
    errs = [(r['workload'], r['contender'], r['rep'], r['error'])
            for r in doc['runs'] if r.get('error')]
    if errs:
        L.append('')
        L.append('## Errors')
        L.append('')
        for e in errs:
            L.append('- %s / %s rep %d: %s' % e)
    if doc.get('plot'):
        L.append('')
        L.append('![time and wire bytes per workload and contender](%s)' %
                 os.path.basename(doc['plot']))
    other = os.path.join(TOP, 'docs', 'benchmarks-qemu10.md')
    on_10 = '10.0' in (doc['machine'].get('qemu') or '')
    if os.path.exists(other) and not on_10:
        L.append('')
        L.append('## QEMU 10.0')
        L.append('')
        L.append('The same benchmark with QEMU 10.0 (Debian 13, scripts/setup-qemu10) on '
                 'both sides: docs/benchmarks-qemu10.md, made by `RDMAX_QEMU_SRC=scripts/qemu10 '
                 'RDMAX_QEMU_DST=scripts/qemu10 scripts/bench --md docs/benchmarks-qemu10.md`.')
    replay = os.path.join(TOP, 'docs', 'benchmarks-replay.md')
    if os.path.exists(replay) and not on_10:
        L.append('')
        L.append('## Cost per page: recorded streams replayed')
        L.append('')
        L.append('No QEMU and no link shaping: rdma-x send | recv against a plain '
                 'socket copy of the same stream, from `scripts/replay-bench --md` '
                 '(docs/benchmarks-replay.md, its own generated file):')
        L.append('')
        with open(replay) as f:
            body = f.read().splitlines()
        L.extend(l for l in body if not l.startswith('# '))
    evac = os.path.join(TOP, 'docs', 'benchmarks-evac.md')
    if os.path.exists(evac) and not on_10:
        L.append('')
        L.append('## Host evacuation')
        L.append('')
        L.append('Several guests leaving one host at once or one after another, QEMU')
        L.append("against rdma-x's service with slots: docs/benchmarks-evac.md, made by")
        L.append('`scripts/evac-bench`; what it shows: docs/evacuation.md.')
    L.append('')
    return '\n'.join(L)


def plot(doc, path):
    cfg, cells = doc['config'], doc['summary']
    contenders = [c for c in CONTENDERS if c in cfg['contenders']]
    wls = cfg['workloads']
    title = 'QEMU 7.2 TCG, %s guest, %d MiB region, tbf %s, %d rep(s), median' % (
        cfg['guest_mem'], cfg['region_mib'], cfg['link'], cfg['reps'])
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return plot_gnuplot(doc, path, contenders, wls, title)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(wls) + 3), 7.5))
    width = 0.8 / len(contenders)
    for ax, key, ylabel in ((axes[0], 'total_ms', 'total time (s)'),
                            (axes[1], 'wire_bytes', 'wire (MiB, src->dst veth)')):
        for i, c in enumerate(contenders):
            xs, ys, nc = [], [], []
            for j, wl in enumerate(wls):
                x = next((x for x in cells if x['workload'] == wl and
                          x['contender'] == c), None)
                if x is None:
                    continue
                v = x[key]
                if key == 'total_ms':
                    if v is None:
                        nc.append(j + i * width)
                        v = cfg['cap_s'] * 1000
                    v /= 1000
                else:
                    v = (v or 0) / 2**20
                xs.append(j + i * width)
                ys.append(v)
            ax.bar(xs, ys, width, label=CONTENDER_LABEL[c])
            for xn in nc:
                ax.text(xn, cfg['cap_s'], 'n.c.', ha='center', va='bottom',
                        fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(wls))])
        ax.set_xticklabels(wls, rotation=20, fontsize=8)
        ax.grid(axis='y', alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gnuplot(doc, path, contenders, wls, title):
    if not shutil.which('gnuplot'):
        log('no matplotlib and no gnuplot: no plot')
        return None
    cells = doc['summary']
    dat = path + '.dat'
    with open(dat, 'w') as f:
        f.write('wl ' + ' '.join(contenders * 2) + '\n')
        for wl in wls:
            row = [wl]
            for key in ('total_ms', 'wire_bytes'):
                for c in contenders:
                    x = next((x for x in cells if x['workload'] == wl and
                              x['contender'] == c), None)
                    v = x[key] if x else None
                    row.append('0' if v is None else '%.2f' % (
                        v / 1000 if key == 'total_ms' else v / 2**20))
            f.write(' '.join(row) + '\n')
    n = len(contenders)
    script = ('set terminal png size 1100,800; set output "%s"; set multiplot '
              'layout 2,1 title "%s"; set style data histograms; set style '
              'fill solid; set xtics rotate by -20; set ylabel "time (s)"; '
              'plot for [i=2:%d] "%s" using i:xtic(1) title columnheader; '
              'set ylabel "wire MiB"; plot for [i=%d:%d] "%s" using i:xtic(1) '
              'title columnheader; unset multiplot' % (
                  path, title, n + 1, dat, n + 2, 2 * n + 1, dat))
    subprocess.run(['gnuplot', '-e', script])
    os.unlink(dat)
    return path if os.path.exists(path) else None


def print_summary(doc):
    cells = doc['summary']
    print()
    print('%-20s %-18s %9s %8s %8s %9s %8s %8s %5s %4s %7s' % (
        'workload', 'contender', 'time s', 'down ms', 'setup', 'wire MiB',
        'srcCPU', 'dstCPU', 'conv', 'ok', 'x fastest'))
    for wl in doc['config']['workloads']:
        best = best_qemu(cells, wl)
        for x in (x for x in cells if x['workload'] == wl):
            ratio = ''
            if x['contender'] == 'rdma-x' and best:
                ratio = ('%.2f' % (x['total_ms'] / best['total_ms'])
                         if x['total_ms'] is not None else 'n.c.')
            elif best and best is x:
                ratio = '(fastest)'
            print('%-20s %-18s %9s %8s %8s %9s %8s %8s %5s %4s %7s' % (
                wl, CONTENDER_LABEL[x['contender']],
                fmt_s(x['total_ms']) if x['total_ms'] is not None else
                '>%d' % doc['config']['cap_s'],
                fmt(x['downtime_ms'], '%.0f'), fmt(x['setup_ms'], '%.0f'),
                fmt(None if x['wire_bytes'] is None else x['wire_bytes'] / 2**20,
                    '%.0f'),
                fmt(x['src_cpu']), fmt(x['dst_cpu']),
                '%d/%d' % (x['converged'], x['runs']),
                '%d/%d' % (x['verified'], x['runs']), ratio))
    print()
    for wl in doc['config']['workloads']:
        rx = next((x for x in cells if x['workload'] == wl and
                   x['contender'] == 'rdma-x'), None)
        if rx is None:
            continue
        for q in (x for x in cells if x['workload'] == wl and
                  x['contender'] in QEMU_MODES):
            if rx['total_ms'] is None:
                t = 'rdma-x did not converge'
            elif q['total_ms'] is None:
                t = '%.1f s vs >%d s (%s did not converge)' % (
                    rx['total_ms'] / 1000, doc['config']['cap_s'],
                    CONTENDER_LABEL[q['contender']])
            else:
                t = '%.2fx the time (%.1f s vs %.1f s)' % (
                    rx['total_ms'] / q['total_ms'], rx['total_ms'] / 1000,
                    q['total_ms'] / 1000)
            w = ''
            if rx['wire_bytes'] and q['wire_bytes'] and q['total_ms'] is not None:
                w = ', %.2fx the wire bytes' % (rx['wire_bytes'] / q['wire_bytes'])
            d = ''
            if rx['downtime_ms'] is not None and q['downtime_ms']:
                d = ', downtime %d vs %d ms' % (rx['downtime_ms'], q['downtime_ms'])
            print('%s: rdma-x vs %s: %s%s%s' % (
                wl, CONTENDER_LABEL[q['contender']], t, w, d))
    for t in doc.get('targets') or []:
        print('target %-18s %-10s <= %.2fx the fastest QEMU mode in this run (%s): %s, %s' % (
            t['workload'], t['what'], t['limit'], CONTENDER_LABEL[t['best']],
            fmt(t['ratio'], '%.2fx'), 'met' if t['met'] else 'not met'))
    sys.stdout.flush()


# ------------------------------------------------------------ main

REPO_TOP = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..'))


def portable_arg(a):
    """An argument as the generator line records it: no local paths. A path
    inside the repository becomes relative to its top, any other absolute
    path is cut to its file name, so the line can be rerun from a checkout."""
    if not a.startswith('/'):
        return a
    r = os.path.realpath(a)
    for top in {REPO_TOP, os.path.realpath(os.getcwd())}:
        if r == top or r.startswith(top + os.sep):
            return os.path.relpath(r, top)
    return os.path.basename(r)


def parse_size(s):
    m = re.fullmatch(r'(\d+)([KMG]?)', s)
    if not m:
        raise argparse.ArgumentTypeError('size like 512M or 1G: %r' % s)
    return int(m.group(1)) << {'': 0, 'K': 10, 'M': 20, 'G': 30}[m.group(2)]


def main():
    ap = argparse.ArgumentParser(
        description='QEMU migration benchmark over a shaped link: QEMU plain, '
                    'xbzrle, multifd+zstd vs rdma-x.')
    ap.add_argument('--preset', choices=sorted(PRESETS), default='quick')
    ap.add_argument('--workloads', help='comma list, MODE@MBPS or idle; '
                    'default per preset (%s)' % ', '.join(WORKLOADS))
    ap.add_argument('--contenders', help='comma list of %s' % ', '.join(CONTENDERS))
    ap.add_argument('--reps', type=int)
    ap.add_argument('--mem', help='guest RAM (not a multiple of 256 KiB!)')
    ap.add_argument('--mib', type=int, help='workload region, MiB')
    ap.add_argument('--cap', type=int, help='seconds before migrate_cancel')
    ap.add_argument('--verify-s', type=int, dest='verify_s')
    ap.add_argument('--link', default='1gbit', help='tbf rate (default 1gbit)')
    ap.add_argument('--lanes', type=int, default=2)
    ap.add_argument('--cache-total', type=parse_size, default=parse_size('1G'),
                    help='rdma-x page cache total (lanes x --cache-size) and '
                    'QEMU xbzrle-cache-size; a power of two (default 1G)')
    ap.add_argument('--send-args', default='',
                    help='extra options for rdma-x send (e.g. "--zstd-level 1")')
    ap.add_argument('--rdmax', default=os.path.join(TOP, 'build', 'rdma-x'))
    ap.add_argument('--out', help='directory for results.json (default '
                    'out/bench/<preset>-<time>)')
    ap.add_argument('--md', help='also write the Markdown report here')
    ap.add_argument('--png', help='also write the plot here')
    ap.add_argument('--merge', action='append', default=[], metavar='JSON',
                    help='add the runs of an earlier results.json for the '
                    '(workload, contender) cells this invocation does not '
                    'measure (e.g. rerun only rdma-x); --reps 0 only merges')
    ap.add_argument('--pool', action='append', default=[], metavar='JSON',
                    help='add every run of an earlier results.json as more '
                    'repetitions of the same cells (same binaries and '
                    'settings, run again later); applied before --merge')
    ap.add_argument('--check', action='store_true',
                    help='exit 1 unless every run converged and verified '
                    '(the smoke test)')
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if isinstance(args.workloads, str):
        args.workloads = args.workloads.split(',')
    if isinstance(args.contenders, str):
        args.contenders = args.contenders.split(',')
    for w in args.workloads:
        parse_workload(w)
    for c in args.contenders:
        if c not in CONTENDERS:
            raise SystemExit('bench: unknown contender %r' % c)
    if args.cache_total & (args.cache_total - 1):
        raise SystemExit('bench: --cache-total must be a power of two '
                         '(QEMU xbzrle-cache-size)')
    if Q.mem_bytes(args.mem) % (256 << 10) == 0:
        raise SystemExit('bench: guest RAM %s is a multiple of 256 KiB: QEMU 7.2 '
                         'TCG loses writes during migration (see '
                         'reference/test-environment.md E)' % args.mem)
    args.rdmax = os.path.abspath(args.rdmax)
    if 'rdma-x' in args.contenders and not os.access(args.rdmax, os.X_OK):
        raise SystemExit('bench: no rdma-x binary at %s' % args.rdmax)
    if os.geteuid() != 0:
        print('SKIP: the benchmark needs root (network namespaces)')
        return Q.SKIP
    Q.require_qemu()
    stamp = datetime.datetime.utcnow().strftime('%Y%m%d-%H%M%S')
    out = args.out or os.path.join(TOP, 'out', 'bench', '%s-%s' % (args.preset, stamp))
    os.makedirs(out, exist_ok=True)

    # A signal ends the run through the finally blocks (guests and link).
    def on_signal(sig, frame):
        raise KeyboardInterrupt('signal %d' % sig)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    t_start = time.monotonic()
    Q.guest_image()  # build or reuse before timing anything
    if 'rdma-x' in args.contenders:
        # others rebuild build/rdma-x while a matrix runs: measure one binary
        snap = os.path.join(out, 'rdma-x')
        if os.path.abspath(snap) != args.rdmax:
            shutil.copy2(args.rdmax, snap)
        args.rdmax_orig, args.rdmax = args.rdmax, snap
        args.rdmax_sha256 = Q.sha256_file(snap)
    runs = []
    doc = dict(command=' '.join(['scripts/bench'] + [portable_arg(a) for a in sys.argv[1:]]),
               date=datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M UTC'),
               machine=machine_info(args), config=config_of(args), runs=runs)
    ncells = args.reps * len(args.workloads) * len(args.contenders)
    log('machine: %s' % json.dumps(doc['machine']))
    log('config: %s' % json.dumps(doc['config']))
    log('benchmark: %d runs (%d workloads x %d contenders x %d reps), cap %d s, '
        'results in %s' % (ncells, len(args.workloads), len(args.contenders),
                           args.reps, args.cap, out))
    port = 20000 + os.getpid() % 20000
    interrupted = False
    with Link(args.link) if args.reps > 0 else NoLink() as link:
        try:
            for rep in range(1, args.reps + 1):
                for wl in args.workloads:
                    for c in args.contenders:
                        port += 1
                        runs.append(run_one(args, link, wl, c, rep, port))
                        save(doc, out, t_start)
        except KeyboardInterrupt as e:
            log('interrupted (%s): writing what was measured' % e)
            interrupted = True
    pool(doc, args.pool)
    merge(doc, args.merge)
    return finish(doc, out, t_start, args, interrupted)


class NoLink:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def pool(doc, files):
    """Add every run of earlier results as further repetitions."""
    cfg = doc['config']
    for path in files:
        with open(path) as f:
            old = json.load(f)
        if not doc['runs'] and not doc.get('pooled_from'):
            doc['machine'] = old['machine']
            for k, v in old['config'].items():
                if k not in ('workloads', 'contenders', 'reps'):
                    cfg[k] = v
        base = max([r['rep'] for r in doc['runs']] or [0])
        for r in old['runs']:
            r = dict(r, rep=base + r['rep'], pooled_from=path)
            doc['runs'].append(r)
        doc.setdefault('pooled_from', []).append(dict(
            file=path, date=old.get('date'), command=old.get('command'),
            rdmax_sha256=old.get('machine', {}).get('rdmax_sha256'),
            runs=len(old['runs'])))
        for wl in old['config']['workloads']:
            if wl not in cfg['workloads']:
                cfg['workloads'].append(wl)
        for c in old['config']['contenders']:
            if c not in cfg['contenders']:
                cfg['contenders'].append(c)
        cfg['reps'] = max(r['rep'] for r in doc['runs'])


def merge(doc, files):
    """Add the runs of earlier results for cells not measured now."""
    cfg = doc['config']
    if not files:
        return
    doc['merged_from'] = []
    measured = {(r['workload'], r['contender']) for r in doc['runs']}
    for path in files:
        with open(path) as f:
            old = json.load(f)
        if not measured and path == files[0]:
            # report only: the first file's machine and configuration
            doc['machine'] = old['machine']
            for k, v in old['config'].items():
                if k not in ('workloads', 'contenders'):
                    cfg[k] = v
        added = [r for r in old['runs']
                 if (r['workload'], r['contender']) not in measured]
        for r in added:
            r['from'] = path
        doc['runs'].extend(added)
        # an earlier file on the command line wins over a later one
        measured |= {(r['workload'], r['contender']) for r in added}
        doc['merged_from'].append(dict(
            file=path, date=old.get('date'), command=old.get('command'),
            rdmax_git=old.get('machine', {}).get('rdmax_git'),
            runs=len(added), cells=sorted({'%s/%s' % (r['workload'], r['contender'])
                                           for r in added})))
        for wl in old['config']['workloads']:
            if wl not in cfg['workloads']:
                cfg['workloads'].append(wl)
        for c in old['config']['contenders']:
            if c not in cfg['contenders']:
                cfg['contenders'].append(c)
        cfg['reps'] = max(cfg['reps'], old['config']['reps'])
    order = {w: i for i, w in enumerate(WORKLOADS)}
    cfg['workloads'].sort(key=lambda w: order.get(w, 99))


def save(doc, out, t_start):
    doc['elapsed'] = '%.0f s' % (time.monotonic() - t_start)
    doc['summary'] = summarize(doc['runs'], doc['config']['workloads'],
                               doc['config']['contenders'])
    doc['targets'] = targets(doc['summary'], doc['config']['workloads'])
    loads = [r['load_before'] for r in doc['runs'] if r.get('load_before') is not None]
    others = [r['others_cpu_s'] for r in doc['runs'] if r.get('others_cpu_s') is not None]
    doc['noise'] = dict(load_min=min(loads) if loads else None,
                        load_median=med(loads), load_max=max(loads) if loads else None,
                        others_median=med(others),
                        others_max=max(others) if others else None)
    tmp = os.path.join(out, 'results.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, 'results.json'))


def finish(doc, out, t_start, args, interrupted):
    save(doc, out, t_start)
    png = args.png or os.path.join(out, 'benchmarks.png')
    try:
        doc['plot'] = plot(doc, png)
    except Exception as e:  # a plot must not lose the measurements
        log('plot failed: %s' % e)
        doc['plot'] = None
    save(doc, out, t_start)
    md = markdown(doc)
    with open(os.path.join(out, 'benchmarks.md'), 'w') as f:
        f.write(md)
    if args.md:
        with open(args.md, 'w') as f:
            f.write(md)
    if args.png and doc['plot'] and os.path.abspath(doc['plot']) != os.path.abspath(args.png):
        shutil.copy(doc['plot'], args.png)
    print_summary(doc)
    log('results: %s/results.json, %s/benchmarks.md%s' % (
        out, out, ', ' + doc['plot'] if doc.get('plot') else ''))
    if interrupted:
        return 130
    if args.check:
        bad = [r for r in doc['runs'] if not r['ok']]
        for r in bad:
            log('FAIL %s / %s: %s' % (r['workload'], r['contender'],
                                      r.get('error') or 'not converged'))
            for k, v in (r.get('logs') or {}).items():
                if v:
                    print('--- %s\n%s' % (k, v))
        return 1 if bad or not doc['runs'] else 0
    return 0


if __name__ == '__main__':
    sys.exit(main())
