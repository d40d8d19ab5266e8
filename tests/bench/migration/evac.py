#!/usr/bin/env python3
"""Host evacuation benchmark: N real QEMU 7.2 TCG guests leave one
namespace-host for another over the shaped link, by each strategy in turn.
Driven by scripts/evac-bench.

Every strategy gets fresh guests, booted from the same kernel and image,
each running its own workload (tests/guest/workload.c, real content), and
migrates all of them:

  qemu-parallel   QEMU multifd+zstd (2 channels, level 1), all at once
  qemu-serial     QEMU multifd+zstd, one after another
  rdmax-slots     QEMU multifd (2 channels, compression none) through one
                  rdma-x service pair with one slot per guest
                  (send --serve --listen-unix x N, recv --serve
                  --connect-unix x N), all at once
  rdmax-serial    the same services, one guest after another
  relay-serial    (on request, a diagnostic: socat may reorder the channels,
                  and QEMU 7.2 then fails) QEMU multifd, compression none, over the same
                  unix sockets through plain socat relays (UNIX-LISTEN,fork
                  -> TCP -> UNIX-CONNECT), one after another: the path
                  without rdma-x

Reported per strategy: makespan (first migrate to last completion),
sum T_i (each guest's completion time from the start: what an operator
waiting for each VM feels), sum of QEMU's own total-time per guest (time
each guest spent in migration), per-guest downtime, wire bytes (source
veth tx), CPU (the whole machine's busy seconds, and rdma-x's own), and
whether every destination guest verified its memory.

Before the first strategy it also measures how much a cross-VM
deduplication could save on these guests: each source guest's RAM is
dumped (paused a moment) and its 4 KiB pages hashed: zero pages, pages
also found in an earlier guest, pages repeated within a guest.

Python 3 standard library; reuses bench.py's link, CPU and verify helpers.
"""

import argparse
import datetime
import hashlib
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402

Q = B.Q
STRATEGIES = ['qemu-parallel', 'qemu-serial', 'rdmax-slots', 'rdmax-serial', 'relay-serial']
# relay-serial (on request): the same unix-socket path as rdmax-*, but through
# a plain socat relay per connection: what the path costs without rdma-x.
# socat's forked children connect on their own, so the destination may see a
# multifd channel before the main one and fail the migration (QEMU 7.2 tells
# the main channel by its order): a diagnostic, not a contender.
DEFAULT_STRATEGIES = STRATEGIES[:4]
DEFAULT_WORKLOADS = ['page-real@8', 'sparse-real@16', 'idle', 'page-real@16']
ZERO_PAGE = bytes(4096)


def log(*a):
    B.log(*a)


def proc_cpu(pid):
    st = B.proc_stat(pid)
    return st[0] if st else 0.0


def dedup_potential(guests, path):
    """Pages of the guests' RAM by kind, as a cross-VM store would see them
    right now: the guests are paused for their dump, one by one."""
    seen = set()
    out = {'guests': len(guests), 'pages': 0, 'zero': 0, 'dup_across': 0,
           'dup_within': 0, 'unique': 0}
    for g in guests:
        g.qmp.cmd('stop')
        try:
            g.dump_ram(path)
        finally:
            g.qmp.cmd('cont')
        mine = set()
        with open(path, 'rb') as f:
            while True:
                page = f.read(4096)
                if len(page) < 4096:
                    break
                out['pages'] += 1
                if page == ZERO_PAGE:
                    out['zero'] += 1
                    continue
                h = hashlib.blake2b(page, digest_size=16).digest()
                if h in seen:
                    out['dup_across'] += 1
                elif h in mine:
                    out['dup_within'] += 1
                else:
                    out['unique'] += 1
                    mine.add(h)
        seen |= mine
        os.unlink(path)
    nz = out['pages'] - out['zero']
    out['dup_across_of_nonzero'] = round(out['dup_across'] / nz, 4) if nz else None
    return out


def start_services(rig, args, link, port, n):
    """One rdma-x service pair with n slots (as on two real hosts): recv in
    the destination namespace, send in the source one."""
    recv = [args.rdmax, 'recv', '--serve', '--listen', '%s:%d' % (B.DST_IP, port),
            '--lanes', str(args.lanes), '--connect-timeout', '60',
            '--stats-json', rig.path('recv.json')]
    send = [args.rdmax, 'send', '--serve', '--to', '%s:%d' % (B.DST_IP, port),
            '--lanes', str(args.lanes), '--cache-size', str(args.cache_total // args.lanes),
            '--stats-json', rig.path('send.json')] + args.send_args.split()
    for k in range(n):
        recv += ['--connect-unix', rig.path('dst%d.sock' % k)]
        send += ['--listen-unix', rig.path('src%d.sock' % k)]
    rx = rig.spawn(['ip', 'netns', 'exec', link.dst_ns] + recv, 'recv.err')
    Q.wait_for(lambda: all(B.listening_in(rx.pid, port + k) for k in range(n)), 15,
               'rdma-x recv to listen on every slot port')
    tx = rig.spawn(['ip', 'netns', 'exec', link.src_ns] + send, 'send.err')
    Q.wait_for(lambda: all(os.path.exists(rig.path('src%d.sock' % k)) for k in range(n)),
               15, 'rdma-x send sockets')
    return tx, rx


def start_relays(rig, link, port, n):
    """Plain socat relays per slot: src k.sock -> TCP port+k -> dst k.sock."""
    procs = []
    for k in range(n):
        procs.append(rig.spawn(['ip', 'netns', 'exec', link.dst_ns, 'socat',
                                'TCP-LISTEN:%d,bind=%s,fork,reuseaddr' % (port + k, B.DST_IP),
                                'UNIX-CONNECT:' + rig.path('dst%d.sock' % k)], 'relay-dst.err'))
    Q.wait_for(lambda: all(B.listening_in(procs[k].pid, port + k) for k in range(n)), 15,
               'socat relays to listen')
    for k in range(n):
        procs.append(rig.spawn(['ip', 'netns', 'exec', link.src_ns, 'socat',
                                'UNIX-LISTEN:%s,fork' % rig.path('src%d.sock' % k),
                                'TCP:%s:%d' % (B.DST_IP, port + k)], 'relay-src.err'))
    Q.wait_for(lambda: all(os.path.exists(rig.path('src%d.sock' % k)) for k in range(n)),
               15, 'socat relay sockets')
    return procs


def run_strategy(args, link, strategy, port, measure_dedup):
    n = len(args.workloads)
    relay = strategy.startswith('relay')
    rdmax = strategy.startswith('rdmax') or relay
    parallel = strategy.endswith(('parallel', 'slots'))
    res = dict(strategy=strategy, guests=[], ok=False, error=None)
    rig = Q.Rig('evac-' + strategy, args.rdmax)
    t_cell = time.monotonic()
    try:
        vms = []
        for k, wl in enumerate(args.workloads):
            mode, rate = B.parse_workload(wl)
            workload = {'mode': mode, 'mib': args.mib, 'rate': rate, 'report': 0.5,
                        'verify': 1}
            dst = rig.guest('dst%d' % k, workload=workload, mem=args.mem, incoming='defer',
                            wrapper=('ip', 'netns', 'exec', link.dst_ns))
            src = rig.guest('src%d' % k, workload=workload, mem=args.mem,
                            wrapper=('ip', 'netns', 'exec', link.src_ns))
            vms.append(dict(k=k, workload=wl, src=src, dst=dst))
        for v in vms:
            v['src'].wait_serial('WORKLOAD-READY', timeout=240)
        for v in vms:
            v['src'].wait_reports(3, timeout=90)
        if measure_dedup:
            res['dedup'] = dedup_potential([v['src'] for v in vms], rig.path('ram.dump'))
            log('dedup potential: %s' % json.dumps(res['dedup']))
        caps, params = B.contender_setup('rdma-x-multifd' if rdmax else 'multifd-zstd', args)
        for v in vms:
            for g in (v['src'], v['dst']):
                Q.set_caps(g.qmp, caps)
                Q.set_params(g.qmp, params)
            k = v['k']
            if rdmax:
                v['dst'].qmp.cmd('migrate-incoming', uri='unix:' + rig.path('dst%d.sock' % k))
                v['uri'] = 'unix:' + rig.path('src%d.sock' % k)
            else:
                v['dst'].qmp.cmd('migrate-incoming', uri='tcp:%s:%d' % (B.DST_IP, port + k))
                v['uri'] = 'tcp:%s:%d' % (B.DST_IP, port + k)
        if rdmax:
            Q.wait_for(lambda: all(os.path.exists(rig.path('dst%d.sock' % v['k']))
                                   for v in vms), 20, 'destination QEMUs to listen')
            services = start_relays(rig, link, port, n) if relay else \
                start_services(rig, args, link, port, n)
        else:
            Q.wait_for(lambda: all(B.listening_in(v['dst'].proc.pid, port + v['k'])
                                   for v in vms), 20, 'destination QEMUs to listen')
            services = ()
        svc_cpu0 = [proc_cpu(p.pid) for p in services]
        w0 = link.counters()
        m0 = B.machine_cpu()
        t0 = time.monotonic()
        pending = list(vms)
        active = []
        while pending or active:
            if pending and (parallel or not active):
                batch = pending if parallel else pending[:1]
                for v in batch:
                    v['t_start'] = time.monotonic() - t0
                    v['src'].qmp.cmd('migrate', uri=v['uri'])
                    active.append(v)
                pending = [v for v in pending if v not in batch]
            for v in list(active):
                info = Q.query_migrate(v['src'].qmp)
                st = info.get('status')
                if st == 'completed' and not info.get('total-time'):
                    continue   # 7.2: the times come a moment later
                if st in ('completed', 'failed', 'cancelled'):
                    v['t_done'] = time.monotonic() - t0
                    v['info'] = info
                    active.remove(v)
            for p in services:
                if p.poll() is not None:
                    raise Q.TestFailure('an rdma-x service exited: ' +
                                        rig.stderr_of('send')[-500:] + rig.stderr_of('recv')[-500:])
            if time.monotonic() - t0 > args.cap:
                log('cap of %d s reached: migrate_cancel on the rest' % args.cap)
                res['capped'] = True
                for v in active:
                    try:
                        v['src'].qmp.cmd('migrate_cancel')
                    except Q.QMPError:
                        pass
                    v['info'] = Q.query_migrate(v['src'].qmp)
                    v['t_done'] = None
                break
            time.sleep(0.1)
        time.sleep(1.0)   # the services finish their stats
        w1 = link.counters()
        m1 = B.machine_cpu()
        res['wire_bytes'] = w1[0] - w0[0]
        res['wire_back_bytes'] = w1[1] - w0[1]
        res['machine_busy_s'] = round(m1[0] - m0[0], 2)
        res['rdmax_cpu_s'] = round(sum(proc_cpu(p.pid) - c for p, c in
                                       zip(services, svc_cpu0)), 2) if services else None
        for v in vms:
            info = v.get('info', {})
            g = dict(k=v['k'], workload=v['workload'], status=info.get('status'),
                     t_start_s=round(v.get('t_start', 0), 2),
                     t_done_s=round(v['t_done'], 2) if v.get('t_done') else None,
                     total_ms=info.get('total-time'), downtime_ms=info.get('downtime'),
                     setup_ms=info.get('setup-time'),
                     converged=info.get('status') == 'completed' and v.get('t_done') is not None,
                     verified=False, error=None)
            if g['converged']:
                B.verify_destination(g, v['src'], v['dst'], args)
            res['guests'].append(g)
        done = [g for g in res['guests'] if g['converged']]
        res['converged'] = len(done)
        res['verified'] = sum(1 for g in done if g['verified'])
        if len(done) == n:
            res['makespan_s'] = round(max(g['t_done_s'] for g in done), 2)
            res['sum_t_s'] = round(sum(g['t_done_s'] for g in done), 2)
            res['sum_in_migration_s'] = round(sum(g['total_ms'] for g in done) / 1000, 2)
            res['max_downtime_ms'] = max(g['downtime_ms'] for g in done)
        res['ok'] = len(done) == n and res['verified'] == n
        if relay:
            res['rdmax_cpu_s'] = None
        elif rdmax:
            res['send_err'] = rig.stderr_of('send')[-1500:]
            res['recv_err'] = rig.stderr_of('recv')[-1500:]
    except (Q.TestFailure, Q.QMPError, OSError) as e:
        res['error'] = '%s: %s' % (type(e).__name__, e)
    finally:
        res['cell_s'] = round(time.monotonic() - t_cell, 1)
        rig.failed = bool(res['error'] or not res['ok'] or os.environ.get('KEEP'))
        if rig.failed:
            res['dir'] = rig.dir
        rig.close()
    log('%-14s %s' % (strategy, brief(res)))
    return res


def brief(r):
    if r.get('error'):
        return 'ERROR ' + r['error']
    if 'makespan_s' not in r:
        return '%d of %d guests converged' % (r['converged'], len(r['guests']))
    return ('makespan %.1f s, sum T_i %.1f s, in migration %.1f s, max downtime %d ms, '
            'wire %.0f MiB, machine CPU %.0f s, %d/%d verified' % (
                r['makespan_s'], r['sum_t_s'], r['sum_in_migration_s'], r['max_downtime_ms'],
                r['wire_bytes'] / 2**20, r['machine_busy_s'], r['verified'], len(r['guests'])))


def markdown(doc):
    a = doc['args']
    out = ['# Host evacuation benchmark', '',
           'Generated by `scripts/evac-bench` on %s; %d guests of %s RAM (workload region '
           '%d MiB, workloads %s), link tbf %s, lanes %d, page cache %s per guest, QEMU '
           'downtime-limit 300 ms, max-bandwidth 10e9. Machine: %s.' % (
               doc['date'], len(a['workloads']), a['mem'], a['mib'],
               ', '.join(a['workloads']), a['link'], a['lanes'],
               '%d MiB' % (a['cache_total'] >> 20), doc['machine']), '',
           '| strategy | makespan s | sum T_i s | in migration s | max downtime ms | '
           'wire MiB | machine CPU s | rdma-x CPU s | verified |',
           '|---|---|---|---|---|---|---|---|---|']
    for r in doc['runs']:
        if 'makespan_s' in r:
            out.append('| %s | %.1f | %.1f | %.1f | %d | %.0f | %.0f | %s | %d/%d |' % (
                r['strategy'], r['makespan_s'], r['sum_t_s'], r['sum_in_migration_s'],
                r['max_downtime_ms'], r['wire_bytes'] / 2**20, r['machine_busy_s'],
                '-' if r['rdmax_cpu_s'] is None else '%.0f' % r['rdmax_cpu_s'],
                r['verified'], len(r['guests'])))
        else:
            out.append('| %s | %s | | | | | | | |' % (r['strategy'], brief(r)))
    out += ['', 'Per guest (completion time from the start / QEMU total-time / downtime):', '']
    for r in doc['runs']:
        cells = ['%s: %s / %s / %s ms%s' % (
            g['workload'], '%.1f s' % g['t_done_s'] if g['t_done_s'] else 'not done',
            '%.1f s' % (g['total_ms'] / 1000) if g['total_ms'] else '-',
            g['downtime_ms'], '' if g['verified'] else ' (NOT verified)')
            for g in r['guests']]
        out.append('* %s: %s' % (r['strategy'], '; '.join(cells)))
    d = doc.get('dedup')
    if d:
        out += ['', 'Cross-VM duplicate pages in the source guests (dumped before the first '
                'strategy): %d pages, %d zero, %d also in an earlier guest (%.1f %% of the '
                'non-zero pages), %d repeated within a guest, %d unique.' % (
                    d['pages'], d['zero'], d['dup_across'],
                    100 * (d['dup_across_of_nonzero'] or 0), d['dup_within'], d['unique'])]
    return '\n'.join(out) + '\n'


def main():
    ap = argparse.ArgumentParser(description='Host evacuation benchmark: N guests, '
                                 'QEMU all at once / one after another vs rdma-x slots.')
    ap.add_argument('--workloads', default=','.join(DEFAULT_WORKLOADS),
                    help='one per guest, MODE@MBPS or idle (default %(default)s)')
    ap.add_argument('--strategies', default=','.join(DEFAULT_STRATEGIES),
                    help='comma list of %s' % ', '.join(STRATEGIES))
    ap.add_argument('--mem', default=Q.BIG_MEM)
    ap.add_argument('--mib', type=int, default=192, help='workload region per guest, MiB')
    ap.add_argument('--cap', type=int, default=240, help='seconds per strategy')
    ap.add_argument('--verify-s', type=int, default=2, dest='verify_s')
    ap.add_argument('--link', default='1gbit')
    ap.add_argument('--lanes', type=int, default=2)
    ap.add_argument('--cache-total', type=B.parse_size, default=B.parse_size('256M'),
                    help='rdma-x page cache per guest (lanes x --cache-size)')
    ap.add_argument('--send-args', default='')
    ap.add_argument('--no-dedup-scan', action='store_true')
    ap.add_argument('--rdmax', default=os.path.join(B.TOP, 'build', 'rdma-x'))
    ap.add_argument('--out')
    ap.add_argument('--md', help='also write the Markdown report here')
    args = ap.parse_args()
    args.workloads = args.workloads.split(',')
    args.strategies = args.strategies.split(',')
    for w in args.workloads:
        B.parse_workload(w)
    for s in args.strategies:
        if s not in STRATEGIES:
            raise SystemExit('evac: unknown strategy %r (%s)' % (s, ', '.join(STRATEGIES)))
    if len(args.workloads) > 8:
        raise SystemExit('evac: at most 8 guests (rdma-x slots)')
    if os.geteuid() != 0:
        print('SKIP: the benchmark needs root (network namespaces)')
        return Q.SKIP
    Q.require_qemu()
    args.rdmax = os.path.abspath(args.rdmax)
    stamp = datetime.datetime.utcnow().strftime('%Y%m%d-%H%M%S')
    out = args.out or os.path.join(B.TOP, 'out', 'bench', 'evac-%s' % stamp)
    os.makedirs(out, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(130))
    doc = {'date': stamp, 'machine': B.machine_info(args) if hasattr(B, 'machine_info') else '',
           'args': {k: v for k, v in vars(args).items()}, 'runs': []}
    if isinstance(doc['machine'], dict):
        doc['machine'] = ', '.join('%s %s' % kv for kv in doc['machine'].items())
    log('evacuation: %d guests (%s), strategies %s, link %s' % (
        len(args.workloads), ', '.join(args.workloads), ', '.join(args.strategies), args.link))
    port = 7300
    with B.Link(args.link) as link:
        for i, s in enumerate(args.strategies):
            r = run_strategy(args, link, s, port + 20 * i, i == 0 and not args.no_dedup_scan)
            if 'dedup' in r:
                doc['dedup'] = r.pop('dedup')
            doc['runs'].append(r)
            with open(os.path.join(out, 'results.json'), 'w') as f:
                json.dump(doc, f, indent=1)
    md = markdown(doc)
    with open(os.path.join(out, 'report.md'), 'w') as f:
        f.write(md)
    if args.md:
        with open(args.md, 'w') as f:
            f.write(md)
    print(md)
    log('results: %s' % out)
    return 0 if all(r['ok'] for r in doc['runs']) else 1


if __name__ == '__main__':
    sys.exit(main())
