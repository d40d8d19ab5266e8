#!/usr/bin/env python3
"""The man pages against the binary they document.

  check-man.py RDMAX MANDIR

Fails (exit 1) when an option of 'rdma-x send --help' or 'rdma-x recv --help'
(with its argument name) is missing from the OPTIONS section of
rdma-x-send(1) / rdma-x-recv(1) or the other way round, when a command of
rdma-x(1) is not accepted by the binary or one of 'rdma-x --help' is not in
rdma-x(1), when a page's .TH version is not the binary's, or when groff
(-ww) or man -l warns while rendering a page. Exit 77 (skip) only when
groff is not installed and everything else passed (scripts/setup installs
groff-base and man-db).
"""
import os
import re
import shutil
import subprocess
import sys

errors = []


def fail(msg):
    errors.append(msg)
    print('FAIL: ' + msg)


def run(argv):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return r.returncode, r.stdout, r.stderr


def roff_text(s):
    """A roff line as plain text: font escapes dropped, \\- as -."""
    s = re.sub(r'\\f(\(..|\[[^]]*\]|.)', '', s)
    s = s.replace('\\-', '-').replace('\\e', '\\').replace('\\(aq', "'")
    s = re.sub(r'\\&', '', s)
    return s.strip()


def man_section(path, name):
    """Lines of section .SH NAME (until the next .SH)."""
    out, inside = [], False
    with open(path) as f:
        for line in f:
            line = line.rstrip('\n')
            if line.startswith('.SH'):
                inside = line[3:].strip().strip('"') == name
                continue
            if inside:
                out.append(line)
    return out


def man_tags(path, section):
    """The tag line after each .TP in a section, as plain text."""
    lines = man_section(path, section)
    tags = []
    for i, line in enumerate(lines):
        if line.startswith('.TP') and i + 1 < len(lines):
            tag = lines[i + 1]
            if tag.startswith('.'):
                # .B/.BI/.BR tag: the macro's words, joined as rendered
                words = re.findall(r'"[^"]*"|\S+', tag)[1:]
                tag = ''.join(w.strip('"') for w in words)
            tags.append(roff_text(tag))
    return tags


def help_options(text):
    """'--opt ARG' for each option line of a --help text (two-space indent)."""
    opts = []
    for line in text.splitlines():
        m = re.match(r'^  (-\S.*?)(?:\s{2,}|$)', line)
        if m:
            opts.append(m.group(1).strip())
    return opts


def th_version(path):
    with open(path) as f:
        for line in f:
            if line.startswith('.TH'):
                m = re.search(r'"rdma-x ([^"]+)"', line)
                return m.group(1) if m else None
    return None


def check_render(path):
    if shutil.which('groff'):
        rc, out, err = run(['groff', '-man', '-Tutf8', '-ww', '-z', path])
        if rc != 0 or err.strip():
            fail('%s: groff -man -ww warns: %s' % (path, err.strip() or 'exit %d' % rc))
    if shutil.which('man'):
        env = dict(os.environ, MANWIDTH='80', MANPAGER='cat', PAGER='cat', LC_ALL='C.UTF-8')
        r = subprocess.run(['man', '--warnings', '-E', 'UTF-8', '-l', path], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0 or r.stderr.strip():
            fail('%s: man -l warns: %s' % (path, r.stderr.strip() or 'exit %d' % r.returncode))
        elif 'NAME' not in r.stdout:
            fail('%s: man -l rendered no NAME section' % path)


def main():
    if len(sys.argv) != 3:
        print('usage: check-man.py RDMAX MANDIR', file=sys.stderr)
        return 2
    rdmax, mandir = sys.argv[1], sys.argv[2]

    rc, out, err = run([rdmax, '--version'])
    m = re.match(r'rdma-x (\S+) ', out)
    if rc != 0 or not m:
        fail('rdma-x --version: exit %d, first line %r' % (rc, out.splitlines()[:1]))
        return 1
    version = m.group(1)

    for sub in ('send', 'recv'):
        page = os.path.join(mandir, 'rdma-x-%s.1' % sub)
        rc, out, err = run([rdmax, sub, '--help'])
        if rc != 0:
            fail('rdma-x %s --help exits %d' % (sub, rc))
            continue
        want = help_options(out)
        have = man_tags(page, 'OPTIONS')
        if not want:
            fail('rdma-x %s --help lists no options (parser out of date?)' % sub)
        for o in want:
            if o not in have:
                fail('%s: option "%s" of rdma-x %s --help is missing from OPTIONS'
                     % (page, o, sub))
        for o in have:
            if o not in want:
                fail('%s: option "%s" in OPTIONS is not in rdma-x %s --help' % (page, o, sub))
        print('%s: %d options of rdma-x %s --help checked' % (os.path.basename(page), len(want), sub))

    page = os.path.join(mandir, 'rdma-x.1')
    rc, usage, err = run([rdmax, '--help'])
    cmds = re.findall(r'^(?:Usage:)?\s+rdma-x (\w+)', usage, re.M)
    flags = re.findall(r'(--\w+)', ' '.join(l for l in usage.splitlines() if '|' in l))
    tags = man_tags(page, 'COMMANDS')
    words = set(w.strip(',') for t in tags for w in t.split())
    for c in cmds + flags:
        if c not in words:
            fail('%s: "%s" of rdma-x --help is missing from COMMANDS' % (page, c))
    for w in sorted(words):
        argv = [rdmax, w] if w.startswith('-') or w in ('help', 'version') else [rdmax, w, '--help']
        rc, out, err = run(argv)
        if rc != 0:
            fail('%s: COMMANDS has "%s", but %s exits %d: %s'
                 % (page, w, ' '.join(argv[1:]), rc, err.strip()))
    print('rdma-x.1: commands checked: %s' % ' '.join(sorted(words)))

    for name in ('rdma-x.1', 'rdma-x-send.1', 'rdma-x-recv.1'):
        path = os.path.join(mandir, name)
        v = th_version(path)
        if v != version:
            fail('%s: .TH says rdma-x %s, the binary is %s' % (path, v, version))
        check_render(path)

    if errors:
        print('%d problem(s)' % len(errors))
        return 1
    if not shutil.which('groff'):
        print('SKIP: groff not installed, pages not rendered (scripts/setup installs groff-base)')
        return 77
    print('man pages match --help and render without warnings')
    return 0


if __name__ == '__main__':
    sys.exit(main())
