#!/usr/bin/env python3
# Independent re-implementation of docs/PROTOCOL.md, checking protocol/tests/vectors/handshake_v1.txt.
import hmac, hashlib, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives import serialization
v = {}
for l in open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'handshake_v1.txt')):
    if l.startswith('#') or not l.strip(): continue
    k, x = l.strip().split(' = '); v[k] = bytes.fromhex(x)
H = lambda k, m: hmac.new(k, m, hashlib.sha256).digest()
def expand(prk, info, n):
    out, t, i = b'', b'', 1
    while len(out) < n:
        t = H(prk, t + info + bytes([i])); out += t; i += 1
    return out[:n]
def pub(priv):
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
for p, fs in (('fs.', True), ('nofs.', False)):
    psk = v[p+'psk']; ir = v[p+'initiator_random']; rr = v[p+'responder_random']
    assert H(psk, b'sealpipe key id')[:8] == v[p+'key_id']
    ni, nr = ir[:32], rr[:32]
    hi = bytes([1, 1 if fs else 0]) + v[p+'key_id'] + ni + (pub(ir[32:]) if fs else b'')
    hi += H(psk, b'sealpipe v1 initiator hello' + hi)
    assert hi == v[p+'hello_i'], p+'hello_i'
    hr = bytes([1, 1 if fs else 0]) + nr + (pub(rr[32:]) if fs else b'')
    hr += H(psk, b'sealpipe v1 responder hello' + hi + hr)
    assert hr == v[p+'hello_r'], p+'hello_r'
    th = hashlib.sha256(hi + hr).digest()
    ikm = psk
    if fs:
        dh = X25519PrivateKey.from_private_bytes(ir[32:]).exchange(X25519PublicKey.from_public_bytes(pub(rr[32:])))
        ikm += dh
    prk = H(ni + nr, ikm)
    fk = expand(prk, b'sealpipe v1 finished' + th, 32)
    assert H(fk, b'sealpipe v1 initiator finished' + th) == v[p+'finished'], p+'finished'
    def direction(secret, recs, name):
        seq = 0
        for i, (ty, pt) in enumerate(recs):
            key = expand(secret, b'sealpipe v1 key', 32); iv = expand(secret, b'sealpipe v1 iv', 12)
            nonce = bytes(a ^ b for a, b in zip(iv, b'\0\0\0\0' + seq.to_bytes(8, 'big')))
            hdr = bytes([ty]) + len(pt).to_bytes(2, 'big')
            rec = hdr + AESGCM(key).encrypt(nonce, pt, hdr)
            assert rec == v[f'{p}{name}.{i}'], f'{p}{name}.{i}'
            seq += 1
            if ty == 3:
                secret = expand(secret, b'sealpipe v1 key update', 32); seq = 0
    direction(expand(prk, b'sealpipe v1 initiator traffic' + th, 32), [(1, b'hello, backend'), (1, b''), (2, b'')], 'i2r')
    direction(expand(prk, b'sealpipe v1 responder traffic' + th, 32), [(3, b''), (1, b'hello, client')], 'r2i')
print('all vectors match the spec')
