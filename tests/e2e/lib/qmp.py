"""Real-QEMU test rig for rdma-x: QMP client, guest launcher, migration helpers.

Python 3 standard library only. Used by the e2e tests in tests/e2e/ and by
tests/e2e/capture-streams.py; the benchmarks may reuse it.

Everything a rig starts (QEMU, and through QEMU's exec: channel the shells,
tee and rdma-x processes) runs in its own process group per QEMU and is
killed when the Rig closes, also on failure. Nothing else is touched.

Facts this relies on (shared/reference/test-environment.md):
- TCG only; guest RAM must not be a multiple of 256 KiB (QEMU 7.2 TCG loses
  writes during migration otherwise): SMALL_MEM / BIG_MEM below.
- The PVH vmlinux boots in ~2.5 s; the busybox initramfs runs the workload
  from `rdmax.KEY=VALUE` kernel command-line words.
- exec: children run as `/bin/sh -c CMD` with stdin and stdout piped; QEMU
  blocks in waitpid() when it closes the channel.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
SMALL_MEM = '263176K'   # 257 MiB + 8 KiB
BIG_MEM = '1048584K'    # 1 GiB + 8 KiB
QEMU = os.environ.get('QEMU', 'qemu-system-x86_64')
SKIP = 77


class QMPError(Exception):
    pass


class TestFailure(Exception):
    pass


def log(*a):
    print('[%7.2f]' % (time.monotonic() - _T0), *a, flush=True)


_T0 = time.monotonic()


# ---------------------------------------------------------------- packages

def _pkg_installed(pkg):
    r = subprocess.run(['dpkg-query', '-W', '-f=${Status}', pkg],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       text=True)
    return 'install ok installed' in r.stdout


def ensure_packages(pkgs):
    """apt-get install the missing ones when root; returns the still missing."""
    missing = [p for p in pkgs if not _pkg_installed(p)]
    if missing and os.geteuid() == 0:
        log('installing', ' '.join(missing))
        env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
        subprocess.run(['apt-get', 'update', '-qq'], env=env)
        subprocess.run(['apt-get', 'install', '-y', '-qq'] + missing, env=env,
                       check=False)
        missing = [p for p in pkgs if not _pkg_installed(p)]
    return missing


def require_qemu():
    """Exit 77 only when QEMU really is absent (and could not be installed)."""
    ensure_packages(['qemu-system-x86', 'coreutils'])
    if not shutil.which(QEMU):
        print('SKIP: %s not found' % QEMU)
        sys.exit(SKIP)


def guest_image():
    """(vmlinux, initrd): build or reuse out/guest (cached by the script)."""
    r = subprocess.run([os.path.join(TOP, 'scripts', 'guest', 'build-initrd')],
                       stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise TestFailure('scripts/guest/build-initrd failed')
    initrd = r.stdout.strip().splitlines()[-1]
    vmlinux = os.path.join(os.path.dirname(initrd), 'kernel', 'vmlinux')
    if not os.path.exists(vmlinux):
        raise TestFailure('no kernel at ' + vmlinux)
    return vmlinux, initrd


# ---------------------------------------------------------------- QMP

class QMP:
    """Minimal synchronous QMP client over a unix socket."""

    def __init__(self, path, timeout=30.0):
        self.path = path
        self.events = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QMPError('cannot connect to QMP at ' + path)
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buf = b''
        greeting = self._read()
        if 'QMP' not in greeting:
            raise QMPError('bad greeting: %r' % greeting)
        self.cmd('qmp_capabilities')

    def _read(self):
        while b'\n' not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise QMPError('QMP connection closed (%s)' % self.path)
            self.buf += data
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line)

    def cmd(self, command, **args):
        # not "name": block-export-add and others take an argument of that name
        name = command
        msg = {'execute': name}
        if args:
            msg['arguments'] = args
        self.sock.sendall(json.dumps(msg).encode() + b'\n')
        while True:
            r = self._read()
            if 'event' in r:
                self.events.append(r)
                continue
            if 'error' in r:
                raise QMPError('%s: %s' % (name, r['error'].get('desc', r)))
            return r.get('return')

    def hmp(self, line):
        return self.cmd('human-monitor-command', **{'command-line': line})

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- processes

def _children_map():
    kids = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % d) as f:
                st = f.read()
            ppid = int(st[st.rindex(')') + 2:].split()[1])
        except (OSError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid):
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def is_listening(port):
    """True when something listens on TCP port (v4 or v6), via /proc/net."""
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == '0A' and \
                            int(parts[1].rsplit(':', 1)[1], 16) == port:
                        return True
        except OSError:
            pass
    return False


def unix_server(path, on_conn):
    """A unix socket at path whose every connection goes to on_conn(sock) in
    a thread of its own (stand-ins for a QEMU or an NBD server); close the
    returned socket to stop it."""
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(4)

    def run():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=on_conn, args=(c,), daemon=True).start()
    threading.Thread(target=run, daemon=True).start()
    return ls


def wait_for(pred, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TestFailure('timed out after %.0f s waiting for %s' %
                              (timeout, what))
        time.sleep(interval)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def first_difference(a, b, chunk=4096):
    """Offset of the first differing byte of two files, or None."""
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
        off = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                for i in range(min(len(x), len(y))):
                    if x[i] != y[i]:
                        return off + i
                return off + min(len(x), len(y))
            if not x:
                return None
            off += len(x)


# ---------------------------------------------------------------- guests

REPORT_RE = re.compile(r'WORKLOAD-REPORT t=([\d.]+) pass=(\d+) pages=(\d+) '
                       r'mbps=([\d.]+) verify_checked=(\d+) verify_bad=(\d+)')


def parse_reports(text):
    """The guest workload's WORKLOAD-REPORT lines in a serial log, as dicts."""
    return [dict(t=float(m[0]), passes=int(m[1]), pages=int(m[2]),
                 mbps=float(m[3]), checked=int(m[4]), bad=int(m[5]))
            for m in REPORT_RE.findall(text)]


def parse_verify_failures(text):
    return [l for l in text.splitlines() if 'VERIFY-FAIL' in l]


def mem_bytes(mem):
    m = re.fullmatch(r'(\d+)([KMG]?)', mem)
    return int(m.group(1)) * {'': 1 << 20, 'K': 1 << 10, 'M': 1 << 20,
                              'G': 1 << 30}[m.group(2)]


def _die_with_parent():
    """In the child before exec: SIGKILL QEMU if the test process dies
    without cleaning up (e.g. killed by a test-runner timeout). Its exec:
    children then see EOF on their pipes and exit."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:   # noqa: best effort
        pass


def _on_signal(signum, frame):
    raise TestFailure('interrupted by signal %d' % signum)


def cleanup_on_signals():
    """SIGTERM/SIGHUP (test-runner timeout) run the normal failure path, so
    the Rig still kills what it started."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


class Guest:
    """One QEMU 7.2 TCG guest booting the rdma-x test image.

    Create guests from the main thread: QEMU is SIGKILLed when the thread
    that started it exits (PR_SET_PDEATHSIG, see _die_with_parent)."""

    def __init__(self, rig, name, workload=None, mem=SMALL_MEM, machine='pc',
                 incoming=None, extra_args=(), extra_append='', kernel=True,
                 wrapper=(), qemu=None):
        self.rig = rig
        # per side: RDMAX_QEMU_SRC / RDMAX_QEMU_DST (e.g. scripts/qemu10) and
        # RDMAX_MACHINE_SRC / _DST (e.g. pc-i440fx-7.2) override for the
        # guests named src / dst, so any migration test runs cross-version
        side = name.upper()
        qemu = qemu or os.environ.get('RDMAX_QEMU_' + side) or QEMU
        machine = os.environ.get('RDMAX_MACHINE_' + side) or machine
        self.name = name
        self.mem = mem
        self.serial = os.path.join(rig.dir, name + '-serial.log')
        self.qmp_path = os.path.join(rig.dir, name + '.qmp')
        self.stderr_path = os.path.join(rig.dir, name + '-qemu.err')
        words = ['console=ttyS0', 'panic=-1']
        workload = dict(workload or {})
        if workload and os.environ.get('E2E_CORRUPT_AFTER'):
            # negative control: the guest undoes one of its own writes
            workload['corrupt-after'] = os.environ['E2E_CORRUPT_AFTER']
        for k, v in workload.items():
            words.append('rdmax.%s=%s' % (k, v))
        if extra_append:
            words.append(extra_append)
        argv = [qemu, '-name', name, '-machine', machine, '-accel', 'tcg',
                '-m', mem, '-smp', '1', '-display', 'none', '-vga', 'none',
                '-nic', 'none', '-no-reboot', '-monitor', 'none',
                '-serial', 'file:' + self.serial,
                '-qmp', 'unix:%s,server=on,wait=off' % self.qmp_path]
        if kernel:
            # without: SeaBIOS finds nothing to boot and idles
            vmlinux, initrd = rig.image()
            argv += ['-kernel', vmlinux, '-initrd', initrd,
                     '-append', ' '.join(words)]
        if incoming:
            argv += ['-incoming', incoming]
        argv += list(extra_args)
        # e.g. ('ip', 'netns', 'exec', NS): it execs QEMU in place, so
        # self.proc.pid stays QEMU's pid (the benchmark's shaped link)
        argv = list(wrapper) + argv
        self.argv = argv
        self.errf = open(self.stderr_path, 'wb')
        # own process group: QEMU's exec: children (sh, tee, rdma-x) join it
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=self.errf, stderr=self.errf,
                                     cwd=rig.dir, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        rig.guests.append(self)
        self.qmp = QMP(self.qmp_path)

    # -- state
    def status(self):
        return self.qmp.cmd('query-status')['status']

    def alive(self):
        return self.proc.poll() is None

    def serial_text(self):
        try:
            with open(self.serial, 'rb') as f:
                return f.read().decode(errors='replace')
        except OSError:
            return ''

    def reports(self):
        return parse_reports(self.serial_text())

    def verify_failures(self):
        return parse_verify_failures(self.serial_text())

    def wait_serial(self, needle, timeout=30, count=1):
        def seen():
            if not self.alive():
                raise TestFailure('%s: QEMU exited (rc %s): %s' % (
                    self.name, self.proc.returncode, self.qemu_stderr()))
            return self.serial_text().count(needle) >= count
        wait_for(seen, timeout, '%s serial: %s' % (self.name, needle))

    def wait_reports(self, n, timeout=30):
        def enough():
            if not self.alive():
                raise TestFailure('%s: QEMU exited' % self.name)
            r = self.reports()
            return r if len(r) >= n else None
        return wait_for(enough, timeout, '%s: %d workload reports' %
                        (self.name, n))

    def qemu_stderr(self):
        try:
            with open(self.stderr_path, 'rb') as f:
                return f.read().decode(errors='replace').strip()
        except OSError:
            return ''

    def exec_children(self, needle=''):
        """Live descendants of this QEMU whose command line has needle."""
        return [p for p in descendants(self.proc.pid)
                if needle in cmdline(p)]

    # -- RAM
    def dump_ram(self, path):
        """Save guest RAM (guest must be stopped) as one file, skipping the
        legacy VGA/ROM hole 0xa0000-0x100000; returns its sha256."""
        size = mem_bytes(self.mem)
        parts = [(0, 0xa0000), (0x100000, size - 0x100000)]
        with open(path, 'wb') as out:
            for i, (addr, length) in enumerate(parts):
                part = '%s.part%d' % (path, i)
                r = self.qmp.hmp('pmemsave %d %d "%s"' % (addr, length, part))
                if r:
                    raise TestFailure('pmemsave: ' + r)
                with open(part, 'rb') as f:
                    shutil.copyfileobj(f, out, 1 << 20)
                os.unlink(part)
        return sha256_file(path)

    def kill(self):
        # QEMU first, then its exec: children (found by parentage while QEMU
        # lives, and by its process group once they are orphans).
        for pid in [self.proc.pid] + descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.qmp.close()
        self.errf.close()


# ---------------------------------------------------------------- migration

def set_caps(qmp, caps):
    if caps:
        qmp.cmd('migrate-set-capabilities', capabilities=[
            {'capability': k, 'state': bool(v)} for k, v in caps.items()])


def set_params(qmp, params):
    if params:
        qmp.cmd('migrate-set-parameters', **params)


def query_migrate(qmp):
    return qmp.cmd('query-migrate')


def wait_migration(qmp, timeout, on_poll=None, interval=0.2,
                   until=('completed', 'failed', 'cancelled')):
    """Poll query-migrate until a status in `until`; migrate_cancel and
    raise after `timeout` s. Returns (last info, list of statuses seen)."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        info = query_migrate(qmp)
        st = info.get('status', 'none')
        if not seen or seen[-1] != st:
            seen.append(st)
            log('migration status:', st)
        if on_poll:
            on_poll(info)
        if st in until:
            return info, seen
        if time.monotonic() > deadline:
            try:
                qmp.cmd('migrate_cancel')
            except QMPError:
                pass
            raise TestFailure('migration not done after %.0f s (status %s): %s'
                              % (timeout, st, json.dumps(info)))
        time.sleep(interval)


def wait_status(guest, wanted, timeout=15):
    def ok():
        st = guest.status()
        return st if st in wanted else None
    return wait_for(ok, timeout, '%s status in %s (now %s)' %
                    (guest.name, wanted, guest.status()))


# ---------------------------------------------------------------- rdma-x

def rdmax_path(argv):
    """The rdma-x under test: argv[1], $RDMAX, or build/rdma-x.
    RDMAX=socat selects a socat stand-in relay (harness development only)."""
    p = argv[1] if len(argv) > 1 else os.environ.get(
        'RDMAX', os.path.join(TOP, 'build', 'rdma-x'))
    if p == 'socat':
        return p
    p = os.path.abspath(p)
    if not os.access(p, os.X_OK):
        raise TestFailure('rdma-x binary not found: %s (build it, or set '
                          'RDMAX)' % p)
    return p


def sh_quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


class Rig:
    """A unique temp dir plus every QEMU started in it; kills all on exit.
    Keeps the directory when the test failed (or KEEP=1) for inspection."""

    def __init__(self, name, rdmax=None):
        base = os.environ.get('E2E_TMPDIR') or None
        self.dir = tempfile.mkdtemp(prefix='rdmax-%s-' % name, dir=base)
        self.guests = []
        self.procs = []
        self.rdmax = rdmax
        self._image = None
        self.failed = True

    def image(self):
        if not self._image:
            self._image = guest_image()
        return self._image

    def path(self, name):
        return os.path.join(self.dir, name)

    def guest(self, name, **kw):
        g = Guest(self, name, **kw)
        v = g.qmp.cmd('query-version')['qemu']
        log('started %s (pid %d, QEMU %d.%d.%d)' % (name, g.proc.pid,
            v['major'], v['minor'], v['micro']))
        return g

    # exec: commands. The tee sits on the forward stream only, so the return
    # path (send's stdout -> source QEMU, dest QEMU -> recv's stdin) is
    # untouched. tee -p on the destination keeps capturing what recv emits
    # even if QEMU stops reading.
    def send_cmd(self, port, capture=None, extra=''):
        q = sh_quote
        if self.rdmax == 'socat':
            relay = 'socat -b65536 STDIO TCP:127.0.0.1:%d' % port
        else:
            relay = '%s send --to 127.0.0.1:%d %s' % (q(self.rdmax), port,
                                                       extra)
        relay += ' 2>%s' % q(self.path('send.err'))
        cmd = relay if not capture else 'tee %s | %s' % (q(capture), relay)
        return 'exec:%s; echo $? >%s' % (cmd, q(self.path('send.rc')))

    def recv_cmd(self, port, capture=None, extra=''):
        q = sh_quote
        if self.rdmax == 'socat':
            relay = ('socat -b65536 TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr '
                     'STDIO' % port)
        else:
            relay = '%s recv --listen 127.0.0.1:%d %s' % (q(self.rdmax), port,
                                                           extra)
        relay += ' 2>%s' % q(self.path('recv.err'))
        relay = '{ %s; echo $? >%s; }' % (relay, q(self.path('recv.rc')))
        if capture:
            relay += ' | tee -p %s' % q(capture)
        return 'exec:' + relay

    def relay_pids(self, guest, which):
        """pids of the rdma-x send/recv process itself (not the sh or tee
        around it) among guest's exec: children."""
        out = []
        for p in descendants(guest.proc.pid):
            argv = cmdline(p).split()
            if not argv:
                continue
            if self.rdmax == 'socat':
                if argv[0] == 'socat' and (
                        (which == 'recv') == any('LISTEN' in a for a in argv)):
                    out.append(p)
            elif argv[0] == self.rdmax and len(argv) > 1 and argv[1] == which:
                out.append(p)
        return out

    def rc(self, which, timeout=15):
        """Exit status of rdma-x send/recv (waits for the file)."""
        p = self.path(which + '.rc')

        def read():
            try:
                with open(p) as f:
                    s = f.read().strip()
                return s if s else None
            except OSError:
                return None
        return int(wait_for(read, timeout, '%s to exit' % which))

    def stderr_of(self, which):
        try:
            with open(self.path(which + '.err'), 'rb') as f:
                return f.read().decode(errors='replace')
        except OSError:
            return ''

    def spawn(self, argv, err):
        """A helper process (rdma-x, socat...) with its stderr in the file
        err of the rig's directory; killed in close()."""
        pr = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL,
                              stderr=open(self.path(err), 'w'))
        self.procs.append(pr)
        return pr

    def close(self):
        for pr in self.procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
        for g in self.guests:
            g.kill()
        if self.failed or os.environ.get('KEEP'):
            log('kept', self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def run_test(name, body, argv=None):
    """Standard main(): 0 pass, 1 fail, 77 skip (QEMU absent)."""
    argv = sys.argv if argv is None else argv
    cleanup_on_signals()
    require_qemu()
    t0 = time.monotonic()
    rig = None
    try:
        rdmax = rdmax_path(argv)
        rig = Rig(name, rdmax)
        body(rig)
        rig.failed = False
        log('PASS %s (%.1f s)' % (name, time.monotonic() - t0))
        return 0
    except (TestFailure, QMPError, AssertionError) as e:
        log('FAIL %s: %s' % (name, e))
        if rig:
            dump_logs(rig)
        return 1
    except Exception:
        traceback.print_exc()
        log('FAIL %s: harness error' % name)
        if rig:
            dump_logs(rig)
        return 1
    finally:
        if rig:
            rig.close()


def dump_logs(rig, tail=25):
    for g in rig.guests:
        lines = g.serial_text().splitlines()
        print('--- %s serial (last %d lines)' % (g.name, tail))
        print('\n'.join(lines[-tail:]))
        err = g.qemu_stderr()
        if err:
            print('--- %s qemu stderr\n%s' % (g.name, err))
    for w in ('send', 'recv'):
        e = rig.stderr_of(w)
        if e:
            print('--- rdma-x %s stderr\n%s' % (w, e[-3000:]))
    sys.stdout.flush()


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def check_dst_verifies(src, dst, sweeps=2, timeout=40):
    """The destination guest's workload sweeps its region `sweeps` more
    times than the source got to, and finds no lost write."""
    last_src = src.reports()[-1]['passes']
    wait_for(lambda: dst.reports() and
             dst.reports()[-1]['passes'] >= last_src + sweeps, timeout,
             'destination workload to sweep its region %d times' % sweeps)
    fails = dst.verify_failures()
    check(not fails, 'lost writes on the destination: ' + '; '.join(fails[:4]))
    rep = dst.reports()[-1]
    check(rep['bad'] == 0, 'destination verify_bad=%d' % rep['bad'])
    log('destination guest verified: %s' % rep)


def check_one_error_line(path):
    """The stderr file of a failed rdma-x has exactly one 'rdma-x: error:' line."""
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.startswith('rdma-x: error:')]
    check(len(lines) == 1, '%s: expected one error line, got %r' %
          (os.path.basename(path), lines))
    log('%s: %s' % (os.path.basename(path), lines[0]))


def check_keeps_running(guest, timeout=20):
    """The guest's workload makes another pass and QEMU says it runs."""
    r0 = guest.reports()[-1]['passes']
    wait_for(lambda: guest.reports()[-1]['passes'] > r0, timeout,
             '%s guest to keep running' % guest.name)
    check(guest.status() == 'running', '%s status %s' % (guest.name, guest.status()))


def check_rdmax_ok(rig):
    """Both rdma-x halves exited 0."""
    for w in ('send', 'recv'):
        check(rig.rc(w) == 0, 'rdma-x %s exit status %d: %s' %
              (w, rig.rc(w), rig.stderr_of(w)))


def check_rdmax_stats(rig, paths, stream_bytes, timeout=15):
    """Each {side: path} --stats-json says result ok and bytes_in equal to
    the stream's size. A half writes it as it exits: wait for it."""
    def read(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None
    for w, path in paths.items():
        st = wait_for(lambda: read(path), timeout, 'rdma-x %s --stats-json' % w)
        log('%s stats: %s' % (w, json.dumps(st)[:300]))
        check(st.get('result') == 'ok', '%s stats: result %s (%s)' %
              (w, st.get('result'), rig.stderr_of(w).strip()))
        check(st.get('bytes_in', stream_bytes) == stream_bytes,
              '%s stats: bytes_in %s, the stream has %d' %
              (w, st.get('bytes_in'), stream_bytes))


def check_identical(cap_src, cap_dst):
    """What the source QEMU wrote is what the destination QEMU read; its size."""
    a, b = os.path.getsize(cap_src), os.path.getsize(cap_dst)
    d = first_difference(cap_src, cap_dst)
    check(d is None, 'streams differ at byte %s (source %d bytes, dest %d)'
          % (d, a, b))
    log('streams identical: %d bytes' % a)
    return a
