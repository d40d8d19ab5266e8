"""A unix-socket relay that records each connection's forward bytes.

QEMU's unix: migration opens several connections to one path (main,
multifd channels, postcopy preempt). UnixCapture(listen, target, prefix)
accepts on `listen`, connects each connection onward to `target` before it
accepts the next (so the far side sees them in the same order), relays both
ways with half-closes passed on, and writes what flowed forward on
connection i to PREFIX-i.bin. So the same relay on both ends of rdma-x
gives per-channel captures to compare: channel i's bytes as the source QEMU
wrote them and as the destination QEMU read them.
"""
import os
import socket
import threading


class UnixCapture:
    def __init__(self, listen, target, prefix, max_conns=None):
        self.target, self.prefix = target, prefix
        self.count = 0
        self.errors = []
        self._threads = []
        self._l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._l.bind(listen)
        self._l.listen(128)
        self._closed = False
        self.max_conns = max_conns   # then it stops listening: later ones are refused
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def path(self, i):
        return '%s-%d.bin' % (self.prefix, i)

    def _accept(self):
        while not self._closed:
            try:
                c, _ = self._l.accept()
            except OSError:
                return
            i = self.count
            try:
                t = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                t.connect(self.target)
            except OSError as e:
                self.errors.append('connection %d: connect %s: %s' % (i, self.target, e))
                c.close()
                continue
            self.count += 1
            f = open(self.path(i), 'wb')
            done = threading.Semaphore(0)
            for a, b, rec in ((c, t, f), (t, c, None)):
                th = threading.Thread(target=self._pump, args=(a, b, rec, done), daemon=True)
                th.start()
                self._threads.append(th)
            th = threading.Thread(target=self._close_both, args=(c, t, f, done), daemon=True)
            th.start()
            self._threads.append(th)
            if self.max_conns is not None and self.count >= self.max_conns:
                self._l.close()
                return

    @staticmethod
    def _pump(a, b, rec, done):
        try:
            while True:
                d = a.recv(1 << 16)
                if not d:
                    break
                if rec:
                    rec.write(d)
                b.sendall(d)
        except OSError:
            pass
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done.release()

    @staticmethod
    def _close_both(c, t, f, done):
        done.acquire()
        done.acquire()
        f.close()
        c.close()
        t.close()

    def close(self, timeout=10):
        """Stop accepting and wait (bounded) for the relays to finish."""
        self._closed = True
        try:
            self._l.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._l.close()
        for th in self._threads:
            th.join(timeout)

    def sizes(self):
        return [os.path.getsize(self.path(i)) for i in range(self.count)]
