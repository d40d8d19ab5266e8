#!/usr/bin/env python3
"""Record real QEMU 7.2 migration streams for the parser unit tests.

Usage: capture-streams.py OUTDIR [NAME...]

Writes into OUTDIR (created), each with `migrate "exec:cat > FILE"` unless
noted, TCG, -m 263176K (257 MiB + 8 KiB, see test-environment.md), -smp 1:

  pc-7.2-idle-bios.bin          pc-i440fx-7.2, no kernel (SeaBIOS idle)
  q35-7.2-idle-bios.bin         pc-q35-7.2, no kernel (SeaBIOS idle)
  pc-7.2-linux-dirty.bin        pc, Linux + workload zero-sparse: 32 MiB
                                dirtied at 8 MB/s, 8 B/page; max-bandwidth
                                40 MiB/s so precopy iterates
  pc-7.2-linux-dirty-xbzrle.bin QEMU's xbzrle capability on (cache 64 MiB),
                                16 MiB dirtied at 30 MB/s, max-bandwidth
                                24 MiB/s: thousands of XBZRLE records (a
                                page is cached when resent after the first
                                round, encoded when dirtied again)
  pc-7.2-linux-postcopy.bin     postcopy-ram + return-path: the source's
                                stream, captured with tee on its way to a
                                live destination QEMU over exec:socat; it
                                holds OPEN_RETURN_PATH, POSTCOPY_ADVISE,
                                DISCARD, PACKAGED and the postcopy RAM pages
  pc-7.2-linux-sparse-random.bin  only when named: 64 MiB of random memory,
                                8 B/page rewritten at 20 MB/s, max-bandwidth
                                40 MiB/s: many precopy rounds resending
                                pages that differ by a few bytes (the case
                                the delta codec is for); for the codec's
                                replay figures, not for the unit tests
  pc-7.2-linux-page-real.bin    only when named: 150 MiB of real content,
                                whole pages rewritten with real content at
                                24 MB/s, max-bandwidth 40 MiB/s: ~540 MB,
                                11 syncs of realistic pages (replay-bench)
  MANIFEST.json                 per file: size, sha256, machine, caps,
                                params, query-migrate's final figures

The same names as shared/testdata/qemu-10.0/ (with 7.2) so tests can treat
both sets alike. The whole run takes well under 2 minutes under TCG.
"""
import json
import os
import struct
import sys
import time

sys.dont_write_bytecode = True     # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'lib'))
from qmp import (QEMU, Rig, TestFailure, check, cleanup_on_signals,  # noqa
                 log, require_qemu, set_caps, set_params, sh_quote,
                 sha256_file, wait_for, wait_migration, wait_status)

# Small on purpose: the Linux guest alone makes ~100 MB of stream, every
# page dirtied during precopy adds 4 KiB per resend.
DIRTY = {'mode': 'zero-sparse', 'mib': 32, 'rate': 8, 'report': 0.5}
# xbzrle needs pages re-dirtied after they were sent (and cached): a small
# region swept often
DIRTY_XBZRLE = {'mode': 'zero-sparse', 'mib': 16, 'rate': 30, 'report': 0.5}
SPARSE_RANDOM = {'mode': 'sparse-random', 'mib': 64, 'rate': 20, 'report': 0.5}
# Realistic content (host libraries, text, compressed files) with whole pages
# rewritten from it: what the replay benchmark measures cost per page on.
PAGE_REAL = {'mode': 'page-real', 'mib': 150, 'rate': 24, 'report': 0.5}
OPT_IN = {'pc-7.2-linux-sparse-random.bin', 'pc-7.2-linux-page-real.bin'}
QEVM_MAGIC = 0x5145564d


def qemu_version():
    import subprocess
    r = subprocess.run([QEMU, '--version'], stdout=subprocess.PIPE, text=True)
    return r.stdout.splitlines()[0]


def check_stream(path):
    with open(path, 'rb') as f:
        head = f.read(8)
    check(len(head) == 8, '%s is empty' % path)
    magic, version = struct.unpack('>II', head)
    check(magic == QEVM_MAGIC and version == 3,
          '%s: not a QEMU migration stream (%08x %d)' % (path, magic, version))


def finish(outdir, name, tmp, meta, info):
    check_stream(tmp)
    final = os.path.join(outdir, name)
    os.replace(tmp, final)
    ram = info.get('ram', {})
    meta.update(size=os.path.getsize(final), sha256=sha256_file(final),
                status=info.get('status'),
                total_time_ms=info.get('total-time'),
                ram_transferred=ram.get('transferred'),
                dirty_sync_count=ram.get('dirty-sync-count'),
                postcopy_requests=ram.get('postcopy-requests'),
                xbzrle=info.get('xbzrle-cache'))
    log('%s: %d bytes, %s syncs' % (name, meta['size'],
                                     meta['dirty_sync_count']))
    return meta


def capture_plain(rig, outdir, name, machine, kernel, caps, params,
                  workload=None):
    """Precopy into `cat > FILE` (no return path)."""
    g = rig.guest(name[:-4].replace('.', '_'), machine=machine, kernel=kernel,
                  workload=workload)
    if kernel:
        g.wait_reports(2, timeout=40)
    else:
        time.sleep(1.0)        # let SeaBIOS reach its idle loop
    set_caps(g.qmp, caps)
    set_params(g.qmp, params)
    tmp = os.path.join(outdir, name + '.tmp')
    g.qmp.cmd('migrate', uri='exec:cat > %s' % sh_quote(tmp))
    info, _ = wait_migration(g.qmp, 60)
    check(info['status'] == 'completed', '%s: migration %s' %
          (name, info['status']))
    meta = dict(machine=machine, guest='linux+workload ' + json.dumps(
        workload) if kernel else 'none (SeaBIOS idle)', capabilities=caps,
        parameters=params, transport='exec:cat > FILE')
    meta = finish(outdir, name, tmp, meta, info)
    g.kill()
    return meta


def capture_postcopy(rig, outdir, name):
    """Source stream of a real postcopy migration, tee'd off the exec:
    forward pipe; socat carries both directions to the destination."""
    sock = rig.path('pc.sock')
    dst = rig.guest('pc-dst', workload=DIRTY, incoming='defer')
    src = rig.guest('pc-src', workload=DIRTY)
    src.wait_reports(2, timeout=40)
    caps = {'postcopy-ram': True, 'return-path': True}
    for g in (src, dst):
        set_caps(g.qmp, caps)
    params = {'max-bandwidth': 24 << 20}
    set_params(src.qmp, params)
    dst.qmp.cmd('migrate-incoming',
                uri='exec:socat STDIO UNIX-LISTEN:%s' % sh_quote(sock))
    wait_for(lambda: os.path.exists(sock), 15, 'destination socket')
    tmp = os.path.join(outdir, name + '.tmp')
    src.qmp.cmd('migrate', uri='exec:tee %s | socat STDIO UNIX-CONNECT:%s'
                % (sh_quote(tmp), sh_quote(sock)))

    def moved():
        i = src.qmp.cmd('query-migrate')
        return (i.get('ram', {}).get('transferred', 0) > 32 << 20 or
                i['status'] not in ('setup', 'active'))
    wait_for(moved, 30, 'precopy to move 32 MiB')
    src.qmp.cmd('migrate-start-postcopy')
    info, seen = wait_migration(src.qmp, 60)
    check(info['status'] == 'completed' and 'postcopy-active' in seen,
          '%s: migration %s (%s)' % (name, info['status'], seen))
    wait_status(dst, ('running',))
    wait_for(lambda: not src.exec_children(), 10, 'exec: child to exit')
    meta = dict(machine='pc', guest='linux+workload ' + json.dumps(DIRTY),
                capabilities=caps, parameters=params,
                transport='exec:tee FILE | socat (live destination)')
    meta = finish(outdir, name, tmp, meta, info)
    src.kill()
    dst.kill()
    return meta


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    outdir = os.path.abspath(argv[1])
    only = set(argv[2:])
    cleanup_on_signals()
    require_qemu()
    os.makedirs(outdir, exist_ok=True)
    fast = {'max-bandwidth': 10_000_000_000}
    slow = {'max-bandwidth': 40 << 20}
    jobs = [
        ('pc-7.2-idle-bios.bin', lambda r: capture_plain(
            r, outdir, 'pc-7.2-idle-bios.bin', 'pc-i440fx-7.2', False, {},
            fast)),
        ('q35-7.2-idle-bios.bin', lambda r: capture_plain(
            r, outdir, 'q35-7.2-idle-bios.bin', 'pc-q35-7.2', False, {},
            fast)),
        ('pc-7.2-linux-dirty.bin', lambda r: capture_plain(
            r, outdir, 'pc-7.2-linux-dirty.bin', 'pc-i440fx-7.2', True, {},
            slow, DIRTY)),
        ('pc-7.2-linux-dirty-xbzrle.bin', lambda r: capture_plain(
            r, outdir, 'pc-7.2-linux-dirty-xbzrle.bin', 'pc-i440fx-7.2', True,
            {'xbzrle': True},
            {'max-bandwidth': 24 << 20, 'xbzrle-cache-size': 64 << 20},
            DIRTY_XBZRLE)),
        ('pc-7.2-linux-postcopy.bin', lambda r: capture_postcopy(
            r, outdir, 'pc-7.2-linux-postcopy.bin')),
        ('pc-7.2-linux-sparse-random.bin', lambda r: capture_plain(
            r, outdir, 'pc-7.2-linux-sparse-random.bin', 'pc-i440fx-7.2', True,
            {}, slow, SPARSE_RANDOM)),
        ('pc-7.2-linux-page-real.bin', lambda r: capture_plain(
            r, outdir, 'pc-7.2-linux-page-real.bin', 'pc-i440fx-7.2', True,
            {}, slow, PAGE_REAL)),
    ]
    t0 = time.monotonic()
    manifest_path = os.path.join(outdir, 'MANIFEST.json')
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    manifest['qemu'] = qemu_version()
    rig = Rig('capture')
    try:
        for name, job in jobs:
            if (only and name not in only) or (not only and name in OPT_IN):
                continue
            manifest.setdefault('files', {})[name] = job(rig)
        rig.failed = False
    except Exception as e:   # noqa: report, keep the rig's logs
        log('capture failed: %s' % e)
        from qmp import dump_logs
        dump_logs(rig)
        return 1
    finally:
        rig.close()
    with open(manifest_path, 'w') as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    log('captured into %s in %.1f s' % (outdir, time.monotonic() - t0))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
