"""Fault-test helpers shared by tests/e2e/test-fault-*.py.

A fault test migrates one running guest again and again: each *attempt*
starts a fresh destination QEMU (`-incoming defer`), migrates through
rdma-x, and either injects a fault (and checks that it ended as a failed
migration with the source guest still running and the destination never
running a guest) or must succeed (and then the destination, verified, is
the source of the next attempt). Each attempt's rdma-x processes write
their stderr and exit status to files named after the attempt.
"""
import os
import re
import signal
import time

from qmp import (QMPError, check, free_port, log, set_caps, set_params,  # noqa
                 sh_quote, wait_for, wait_migration, wait_status)

WORKLOAD = {'mode': 'sparse-random', 'mib': 32, 'rate': 30, 'report': 0.5}
ERR_LINE = re.compile(r'^rdma-x: error: .+$', re.M)
FAST = 10_000_000_000


def listening_in(pid, port):
    """True when something listens on TCP port in the network namespace of
    process pid (so it works for a QEMU started inside a netns)."""
    for table in ('tcp', 'tcp6'):
        try:
            with open('/proc/%d/net/%s' % (pid, table)) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == '0A' and \
                            int(parts[1].rsplit(':', 1)[1], 16) == port:
                        return True
        except (OSError, StopIteration):
            pass
    return False


class Attempt:
    """One migration of src to a new destination guest `tag`."""

    def __init__(self, rig, src, tag, send_to='127.0.0.1', listen='127.0.0.1',
                 connect_port=None, send_extra='', recv_extra='', caps=None,
                 bw=FAST, dst_wrapper=(), port=None, prefix=None, mem=None):
        self.rig, self.src, self.tag = rig, src, tag
        self.port = port or free_port()
        q = sh_quote
        exe = q(rig.rdmax)
        self.files = {w: (rig.path('%s-%s.err' % (tag, w)),
                          rig.path('%s-%s.rc' % (tag, w)))
                      for w in ('send', 'recv')}
        err, rc = self.files['recv']
        prefix = prefix or {}   # e.g. /usr/bin/time, to measure rdma-x
        recv = '%s%s recv --listen %s:%d %s 2>%s; echo $? >%s' % (
            prefix.get('recv', ''), exe, listen, self.port, recv_extra, q(err),
            q(rc))
        err, rc = self.files['send']
        send = '%s%s send --to %s:%d --connect-timeout 3 %s 2>%s; echo $? >%s' % (
            prefix.get('send', ''), exe, send_to, connect_port or self.port,
            send_extra, q(err), q(rc))
        kw = {'mem': mem} if mem else {}
        self.dst = rig.guest(tag, workload=WORKLOAD, incoming='defer',
                             wrapper=dst_wrapper, **kw)
        # every capability a fault test touches, so none lingers on src
        allcaps = {'return-path': True, 'pause-before-switchover': False}
        allcaps.update(caps or {})
        for g in (src, self.dst):
            set_caps(g.qmp, allcaps)
        set_params(src.qmp, {'max-bandwidth': bw})
        self.dst.qmp.cmd('migrate-incoming', uri='exec:{ %s; }' % recv)
        wait_for(lambda: listening_in(self.dst.proc.pid, self.port), 15,
                 'rdma-x recv to listen (%s)' % tag)
        src.qmp.cmd('migrate', uri='exec:' + send)
        log('%s: migrating' % tag)

    # -- the rdma-x processes of this attempt
    def pids(self, which):
        g = self.src if which == 'send' else self.dst
        out = []
        from qmp import cmdline, descendants
        for p in descendants(g.proc.pid):
            argv = cmdline(p).split()
            if len(argv) > 1 and argv[0] == self.rig.rdmax and argv[1] == which:
                out.append(p)
        return out

    def connected(self, which):
        """True once every rdma-x `which` process has a socket open."""
        def has_socket(p):
            try:
                return any(os.readlink('/proc/%d/fd/%s' % (p, fd)).startswith(
                    'socket:') for fd in os.listdir('/proc/%d/fd' % p))
            except OSError:
                return False
        pids = self.pids(which)
        return pids and all(has_socket(p) for p in pids)

    def signal(self, which, sig):
        pids = wait_for(lambda: self.pids(which), 10,
                        'rdma-x %s of %s' % (which, self.tag), interval=0.02)
        for p in pids:
            os.kill(p, sig)
        log('%s: sent signal %d to rdma-x %s %s' % (self.tag, sig, which, pids))
        return pids

    def rc(self, which, timeout=20):
        path = self.files[which][1]

        def read():
            try:
                with open(path) as f:
                    s = f.read().strip()
                return s or None
            except OSError:
                return None
        return int(wait_for(read, timeout, '%s %s to exit' % (self.tag, which)))

    def stderr(self, which):
        try:
            with open(self.files[which][0], 'rb') as f:
                return f.read().decode(errors='replace')
        except OSError:
            return ''

    def exited(self, which):
        return os.path.exists(self.files[which][1])

    def wait_moved(self, nbytes, timeout=40):
        def moved():
            i = self.src.qmp.cmd('query-migrate')
            check(i['status'] in ('setup', 'active'),
                  '%s: migration %s before the fault: %s' %
                  (self.tag, i['status'], i.get('error-desc', '')))
            return i.get('ram', {}).get('transferred', 0) >= nbytes
        wait_for(moved, timeout, '%s: %d bytes to move' % (self.tag, nbytes))

    def wait_pre_switchover(self, timeout=60):
        def there():
            st = self.src.qmp.cmd('query-migrate')['status']
            check(st in ('setup', 'active', 'pre-switchover'),
                  '%s: migration %s before the fault' % (self.tag, st))
            return st == 'pre-switchover'
        wait_for(there, timeout, '%s: pre-switchover' % self.tag)

    def release_switchover(self):
        try:
            self.src.qmp.cmd('migrate-continue', state='pre-switchover')
        except QMPError as e:   # it may have failed already: fine
            log('%s: migrate-continue: %s' % (self.tag, e))

    # -- outcomes
    def expect_failed(self, killed=(), reasons=None, within=25,
                      status='failed'):
        """The source QEMU marks the migration failed within `within` s and
        keeps running its guest; every rdma-x process not in `killed` exits
        non-zero with an `rdma-x: error:` line (matching reasons[side]);
        the destination QEMU never runs the guest."""
        t0 = time.monotonic()
        info, _ = wait_migration(self.src.qmp, within)
        dt = time.monotonic() - t0
        check(info['status'] == status, '%s: source migration ended %s, '
              'not %s' % (self.tag, info['status'], status))
        log('%s: source migration %s after %.1f s: %s' %
            (self.tag, info['status'], dt, info.get('error-desc', '')))
        wait_status(self.src, ('running',), 15)
        for which in ('send', 'recv'):
            if which in killed:
                continue
            rc = self.rc(which)
            err = self.stderr(which)
            log('%s: rdma-x %s exit %d: %s' % (self.tag, which, rc,
                                                err.strip()[-400:]))
            check(rc != 0, '%s: rdma-x %s exited 0' % (self.tag, which))
            check(ERR_LINE.search(err), '%s: no "rdma-x: error: ..." line from '
                  '%s' % (self.tag, which))
            want = (reasons or {}).get(which)
            if want:
                check(re.search(want, err), '%s: %s reason does not match %r: '
                      '%s' % (self.tag, which, want, err.strip()))
        self.expect_dst_never_ran()
        # the source guest keeps running, its memory intact
        n = len(self.src.reports())
        self.src.wait_reports(n + 2, timeout=30)
        fails = self.src.verify_failures()
        check(not fails, 'source guest: ' + '; '.join(fails[:4]))
        check(self.src.reports()[-1]['bad'] == 0, 'source verify_bad > 0')

    def expect_dst_never_ran(self, settle=10):
        """The destination QEMU exits (failed load) or stays incoming; it
        never runs the guest."""
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and self.dst.alive():
            try:
                st = self.dst.status()
            except (QMPError, OSError):
                break
            check(st != 'running', '%s: destination guest RUNS after a failed '
                  'migration' % self.tag)
            time.sleep(0.2)
        if self.dst.alive():
            try:
                st = self.dst.status()
                check(st != 'running', '%s: destination guest runs' % self.tag)
                log('%s: destination QEMU still %s; killing it' % (self.tag, st))
            except (QMPError, OSError):
                pass
        else:
            log('%s: destination QEMU exited (rc %s): %s' % (
                self.tag, self.dst.proc.returncode,
                self.dst.qemu_stderr().splitlines()[-1:]))
        self.dst.kill()

    def expect_completed(self, timeout=90):
        """Completed, destination runs and verifies, both rdma-x exit 0.
        Returns the destination guest (the next source)."""
        info, _ = wait_migration(self.src.qmp, timeout)
        check(info['status'] == 'completed', '%s: migration %s: %s' % (
            self.tag, info['status'], info.get('error-desc', '')))
        log('%s: completed in %s ms, downtime %s ms' % (
            self.tag, info.get('total-time'), info.get('downtime')))
        wait_status(self.dst, ('running',))
        check(self.src.status() == 'postmigrate',
              'source status ' + self.src.status())
        last = self.src.reports()[-1]['passes']
        wait_for(lambda: self.dst.reports() and
                 self.dst.reports()[-1]['passes'] >= last + 2, 60,
                 '%s: destination workload to sweep twice' % self.tag)
        fails = self.dst.verify_failures()
        check(not fails, '%s: lost writes: %s' % (self.tag, '; '.join(fails[:4])))
        check(self.dst.reports()[-1]['bad'] == 0, '%s: verify_bad' % self.tag)
        for which in ('send', 'recv'):
            rc = self.rc(which)
            check(rc == 0, '%s: rdma-x %s exit %d: %s' % (
                self.tag, which, rc, self.stderr(which)))
        log('%s: destination verified' % self.tag)
        return self.dst


def migrate_ok(rig, src, tag, **kw):
    """A clean migration that must succeed; the old source is killed and the
    verified destination returned (it is the source from now on)."""
    a = Attempt(rig, src, tag, **kw)
    dst = a.expect_completed()
    src.kill()
    return dst
