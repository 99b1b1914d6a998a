#!/usr/bin/env python3
"""Independent re-implementation of docs/PROTOCOL.md (version 2), checking handshake_v2.txt.

Everything is recomputed from the vector's inputs (the PSK, each side's random bytes, the
OPEN addresses and record plaintexts listed below) and compared byte for byte with the file.

Only the Python standard library is used: hmac/hashlib for HMAC-SHA256, HKDF and SHA-256, and
small textbook implementations of X25519 (RFC 7748) and AES-256-GCM (FIPS 197, SP 800-38D)
below, each pinned to published known-answer tests before the vectors are checked. They are
slow and not constant-time: fine for checking vectors, never for real traffic.

Run from anywhere: python3 protocol/tests/vectors/check_vectors.py
"""
import hashlib
import hmac
import ipaddress
import os
import sys

VECTORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'handshake_v2.txt')


def check(ok, what):
    if not ok:
        sys.exit('MISMATCH: ' + what)


# --- X25519 (RFC 7748 section 5) ----------------------------------------------------------

P25519 = 2**255 - 19


def x25519(k, u):
    k = bytearray(k)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    k = int.from_bytes(k, 'little')
    x1 = int.from_bytes(u, 'little') & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        kt = (k >> t) & 1
        swap ^= kt
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = kt
        a, b = (x2 + z2) % P25519, (x2 - z2) % P25519
        aa, bb = a * a % P25519, b * b % P25519
        e = (aa - bb) % P25519
        c, d = (x3 + z3) % P25519, (x3 - z3) % P25519
        da, cb = d * a % P25519, c * b % P25519
        x3 = (da + cb) ** 2 % P25519
        z3 = x1 * (da - cb) ** 2 % P25519
        x2 = aa * bb % P25519
        z2 = e * (aa + 121665 * e) % P25519
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, P25519 - 2, P25519) % P25519).to_bytes(32, 'little')


def x25519_public(k):
    return x25519(k, (9).to_bytes(32, 'little'))


# --- AES-256 (FIPS 197) --------------------------------------------------------------------

def _sbox():
    def gmul(a, b):
        r = 0
        while b:
            if b & 1:
                r ^= a
            a = ((a << 1) ^ 0x11b) & 0xff if a & 0x80 else a << 1
            b >>= 1
        return r
    box = []
    for x in range(256):
        inv = next((y for y in range(1, 256) if gmul(x, y) == 1), 0)
        s = inv
        for i in range(1, 5):
            s ^= ((inv << i) | (inv >> (8 - i))) & 0xff
        box.append(s ^ 0x63)
    return box


SBOX = _sbox()


def _xtime(a):
    return ((a << 1) ^ 0x1b) & 0xff if a & 0x80 else a << 1


def aes256_expand(key):
    words = [list(key[4 * i:4 * i + 4]) for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = list(words[i - 1])
        if i % 8 == 0:
            t = [SBOX[b] for b in t[1:] + t[:1]]
            t[0] ^= rcon
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            t = [SBOX[b] for b in t]
        words.append([a ^ b for a, b in zip(words[i - 8], t)])
    return [sum(words[4 * r:4 * r + 4], []) for r in range(15)]


def aes256_block(round_keys, block):
    s = [a ^ b for a, b in zip(block, round_keys[0])]
    for rnd in range(1, 15):
        s = [SBOX[b] for b in s]
        s = [s[(i + 4 * (i % 4)) % 16] for i in range(16)]  # ShiftRows (column-major state)
        if rnd != 14:
            mixed = []
            for c in range(4):
                a = s[4 * c:4 * c + 4]
                t = a[0] ^ a[1] ^ a[2] ^ a[3]
                mixed += [a[i] ^ t ^ _xtime(a[i] ^ a[(i + 1) % 4]) for i in range(4)]
            s = mixed
        s = [a ^ b for a, b in zip(s, round_keys[rnd])]
    return bytes(s)


# --- AES-256-GCM (SP 800-38D, 96-bit IV) --------------------------------------------------

def _gf_mul(x, y):
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
    return z


def _ghash(h, data):
    y = 0
    for i in range(0, len(data), 16):
        y = _gf_mul(y ^ int.from_bytes(data[i:i + 16], 'big'), h)
    return y


def _pad16(b):
    return b + bytes(-len(b) % 16)


def aes256_gcm_seal(key, iv, plaintext, aad):
    rk = aes256_expand(key)
    h = int.from_bytes(aes256_block(rk, bytes(16)), 'big')
    j0 = iv + b'\x00\x00\x00\x01'
    out = bytearray()
    for i in range(0, len(plaintext), 16):
        counter = iv + ((2 + i // 16) & 0xffffffff).to_bytes(4, 'big')
        stream = aes256_block(rk, counter)
        out += bytes(a ^ b for a, b in zip(plaintext[i:i + 16], stream))
    lengths = (8 * len(aad)).to_bytes(8, 'big') + (8 * len(out)).to_bytes(8, 'big')
    s = _ghash(h, _pad16(aad) + _pad16(bytes(out)) + lengths)
    tag = (s ^ int.from_bytes(aes256_block(rk, j0), 'big')).to_bytes(16, 'big')
    return bytes(out) + tag


def self_test():
    # RFC 7748 section 5.2 (first vector) and 6.1 (Alice and Bob).
    k = bytes.fromhex('a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4')
    u = bytes.fromhex('e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c')
    check(x25519(k, u).hex() ==
          'c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552', 'RFC 7748 5.2')
    a = bytes.fromhex('77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a')
    b = bytes.fromhex('5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb')
    check(x25519_public(a).hex() ==
          '8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a', 'RFC 7748 6.1')
    shared = '4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742'
    check(x25519(a, x25519_public(b)).hex() == shared, 'RFC 7748 6.1 shared')
    # FIPS 197 appendix C.3.
    rk = aes256_expand(bytes(range(32)))
    check(aes256_block(rk, bytes.fromhex('00112233445566778899aabbccddeeff')).hex() ==
          '8ea2b7ca516745bfeafc49904b496089', 'FIPS 197 C.3')
    # GCM spec test case 16 (AES-256, 60-byte plaintext, AAD).
    key = bytes.fromhex('feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308')
    pt = bytes.fromhex('d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72'
                       '1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39')
    aad = bytes.fromhex('feedfacedeadbeeffeedfacedeadbeefabaddad2')
    want = ('522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa'
            '8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662'
            '76fc6ece0f4e1768cddf8853bb2d551b')
    check(aes256_gcm_seal(key, bytes.fromhex('cafebabefacedbaddecaf888'), pt, aad).hex() == want,
          'GCM test case 16')


# --- The protocol ---------------------------------------------------------------------------

def hmac256(key, msg):
    return hmac.new(key, msg, hashlib.sha256).digest()


def hkdf_extract(salt, ikm):
    return hmac256(salt, ikm)


def hkdf_expand(prk, info, n):
    out, t, i = b'', b'', 1
    while len(out) < n:
        t = hmac256(prk, t + info + bytes([i]))
        out += t
        i += 1
    return out[:n]


def expand_label(secret, label, context, n):
    full = b'sealpipe v2 ' + label
    info = n.to_bytes(2, 'big') + bytes([len(full)]) + full + bytes([len(context)]) + context
    return hkdf_expand(secret, info, n)


def open_payload(proxied, src, dst):
    (sip, sport), (dip, dport) = src, dst
    s, d = ipaddress.ip_address(sip), ipaddress.ip_address(dip)
    family = 4 if s.version == 4 else 6
    return (bytes([1 if proxied else 0, family]) + s.packed + sport.to_bytes(2, 'big') +
            d.packed + dport.to_bytes(2, 'big'))


# What each vector carries besides the handshake (docs/PROTOCOL.md, "Test vectors").
RECORDS = {
    'fs.': dict(open=(False, ('192.0.2.10', 40001), ('198.51.100.7', 6379)), abort=1),
    'nofs.': dict(open=(True, ('2001:db8::10', 40001), ('2001:db8::7', 5432)), abort=2),
}
DATA, END, KEY_UPDATE, ABORT, OPEN = 1, 2, 3, 4, 5


def direction(v, name, secret, records):
    seq = 0
    for i, (ty, pt) in enumerate(records):
        key = expand_label(secret, b'key', b'', 32)
        iv = expand_label(secret, b'iv', b'', 12)
        nonce = bytes(a ^ b for a, b in zip(iv, bytes(4) + seq.to_bytes(8, 'big')))
        header = bytes([ty]) + len(pt).to_bytes(2, 'big')
        record = header + aes256_gcm_seal(key, nonce, pt, header)
        check(record == v[f'{name}.{i}'], f'{name}.{i}')
        seq += 1
        if ty == KEY_UPDATE:
            secret, seq = expand_label(secret, b'key update', b'', 32), 0


def check_vector(v, p, fs):
    psk = v[p + 'psk']
    irand, rrand = v[p + 'initiator_random'], v[p + 'responder_random']
    # Keys: the PSK is only used through its subkeys.
    psk_prk = hkdf_extract(b'sealpipe v2 psk', psk)
    key_id = expand_label(psk_prk, b'key id', b'', 8)
    hello_mac = expand_label(psk_prk, b'hello mac', b'', 32)
    psk_secret = expand_label(psk_prk, b'psk secret', b'', 32)
    check(key_id == v[p + 'key_id'], p + 'key_id')
    # Hellos. Each side draws its nonce first, then (with FS) its X25519 private key.
    flags = bytes([2, 1 if fs else 0])
    nonce_i, nonce_r = irand[:32], rrand[:32]
    hello_i = flags + key_id + nonce_i + (x25519_public(irand[32:]) if fs else b'')
    hello_i += hmac256(hello_mac, hello_i)
    check(hello_i == v[p + 'hello_i'], p + 'hello_i')
    body_r = flags + nonce_r + (x25519_public(rrand[32:]) if fs else b'')
    ikm = psk_secret
    if fs:
        dh_i = x25519(irand[32:], x25519_public(rrand[32:]))
        dh_r = x25519(rrand[32:], x25519_public(irand[32:]))
        check(dh_i == dh_r, p + 'X25519 agreement')
        ikm += dh_i
    prk = hkdf_extract(nonce_i + nonce_r, ikm)
    th_r = hashlib.sha256(hello_i + body_r).digest()
    hello_r = body_r + hmac256(expand_label(prk, b'responder finished', th_r, 32), th_r)
    check(hello_r == v[p + 'hello_r'], p + 'hello_r')
    th = hashlib.sha256(hello_i + hello_r).digest()
    finished = hmac256(expand_label(prk, b'initiator finished', th, 32), th)
    check(finished == v[p + 'finished'], p + 'finished')
    # Records.
    r = RECORDS[p]
    direction(v, p + 'i2r', expand_label(prk, b'i2r traffic', th, 32),
              [(OPEN, open_payload(*r['open'])), (DATA, b'hello, backend'), (DATA, b''),
               (END, b'')])
    direction(v, p + 'r2i', expand_label(prk, b'r2i traffic', th, 32),
              [(KEY_UPDATE, b''), (DATA, b'hello, client'), (ABORT, bytes([r['abort']]))])
    # The same session as a warm one closed unused (section 6.7): END first from the initiator,
    # ABORT `unopened` (0x05) first from the responder.
    direction(v, p + 'warm.i2r', expand_label(prk, b'i2r traffic', th, 32), [(END, b'')])
    direction(v, p + 'warm.r2i', expand_label(prk, b'r2i traffic', th, 32), [(ABORT, bytes([5]))])


def main():
    self_test()
    v = {}
    with open(VECTORS) as f:
        for line in f:
            if line.startswith('#') or not line.strip():
                continue
            k, x = line.strip().split(' = ')
            v[k] = bytes.fromhex(x)
    check_vector(v, 'fs.', True)
    check_vector(v, 'nofs.', False)
    print(f'all {len(v)} vectors match the spec (python standard library only)')


if __name__ == '__main__':
    main()
