/* A per-packet path in C for SSH CHANNEL_DATA under aes*-gcm@openssh.com: the measurement of issue 22's
 * "compiled per-packet path that owns its state" (bench/README.md, "A per-packet path in C, measured").
 * Not part of the product: bench/fastpacket_micro.py builds and drives it beside gateway/splice.py.
 *
 * One Conn object per SSH connection owns, in one C struct, what gateway/splice.py reads from asyncssh's
 * instance dicts per packet: both directions' AES-GCM contexts (OpenSSL's key schedule kept, only the nonce
 * set per packet), RFC 5647's 64-bit invocation counters, the sequence numbers, the rekey byte count and a
 * small table of channels (numbers, windows, packet size, whether the fast path may carry them now).
 *
 *   Conn.receive(data, out)  open each whole CHANNEL_DATA packet at the start of `data`; with `out` (another
 *                            Conn: the gateway) re-seal its data for the linked channel there and return the
 *                            sealed bytes, without (the runner) return the data itself. Stops at the first
 *                            packet it may not carry (partial, not CHANNEL_DATA, a failed tag, a closed or
 *                            full channel, anything malformed) without consuming it: `consumed` says where,
 *                            and the caller hands the rest to asyncssh, as splice.py does.
 *   Conn.send(index, data)   seal `data` as CHANNEL_DATA packets on channel `index`, None if it may not.
 *
 * The packet checks are splice.py's (FastPath.data_received / _take_data / _send), on untrusted input:
 * every length is checked against the buffer before it is read.
 *
 *   gcc -O2 -shared -fPIC $(python3-config --includes) _fastpacket.c -lcrypto -o _fastpacket$(python3-config --extension-suffix)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#else
#define CALLGRIND_TOGGLE_COLLECT
#endif

#define TAG 16
#define BLOCK 16
#define MIN_PAD 4
#define MSG_CHANNEL_DATA 94
#define MAXCHAN 8
#define STACK_PLAIN 512

typedef struct {
    EVP_CIPHER_CTX *ctx;
    unsigned char fixed[4];
    uint64_t counter;
} Gcm;

typedef struct {
    uint32_t recv_chan, send_chan;    /* our number (the peer's recipient field), the peer's number */
    uint32_t recv_window, init_recv_window, send_window, send_pktsize;
    int ok;                           /* open both ways, not paused, nothing queued: the fast path's to carry */
    int link;                         /* with receive(data, out): the channel index in `out` its data goes to */
} Chan;

typedef struct {
    PyObject_HEAD
    Gcm rx, tx;
    uint32_t recv_seq, send_seq, max_recv_pktlen;
    uint64_t rekey_bytes, rekey_bytes_sent;
    int send_ok;                      /* kex and auth complete, no rekey due by time (the caller keeps it) */
    int nchans;
    Chan chans[MAXCHAN];
    Py_ssize_t consumed;
    int adjust;                       /* index of a channel owed a WINDOW_ADJUST (-1: none) */
    unsigned long long relayed;
} Conn;

/* Random padding, drawn from OpenSSL's generator 4 KiB at a time (splice.py's _Padding). */
static unsigned char pad_pool[4096];
static size_t pad_pos = sizeof(pad_pool);

static int take_padding(unsigned char *to, size_t n) {
    if (pad_pos + n > sizeof(pad_pool)) {
        if (RAND_bytes(pad_pool, sizeof(pad_pool)) != 1) return 0;
        pad_pos = 0;
    }
    memcpy(to, pad_pool + pad_pos, n);
    pad_pos += n;
    return 1;
}

static inline uint32_t get_u32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void put_u32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static inline void nonce(const Gcm *g, unsigned char iv[12]) {
    memcpy(iv, g->fixed, 4);
    for (int i = 0; i < 8; i++) iv[4 + i] = (unsigned char)(g->counter >> (56 - 8 * i));
}

static int gcm_restore(Gcm *g);

static int gcm_init(Gcm *g, const unsigned char *key, Py_ssize_t keylen, const unsigned char *iv, int enc) {
    const EVP_CIPHER *cipher = keylen == 16 ? EVP_aes_128_gcm() : keylen == 32 ? EVP_aes_256_gcm() : NULL;
    if (cipher == NULL) return 0;
    g->ctx = EVP_CIPHER_CTX_new();
    if (g->ctx == NULL || EVP_CipherInit_ex(g->ctx, cipher, NULL, key, NULL, enc) != 1) return 0;
    memcpy(g->fixed, iv, 4);
    g->counter = 0;
    for (int i = 0; i < 8; i++) g->counter = (g->counter << 8) | iv[4 + i];
#ifndef FASTPACKET_INIT_IV
    return gcm_restore(g);
#else
    return 1;
#endif
}

#ifndef FASTPACKET_INIT_IV
/* OpenSSH's way (cipher.c): OpenSSL keeps the nonce and steps its 64-bit counter itself (EVP_CTRL_GCM_IV_GEN),
 * and EVP_Cipher goes straight to the provider's cipher function, where EVP_*Init_ex with a new IV per packet
 * asks the provider for the IV length and resets its state each time (measured: ~2,500 instructions per
 * packet, most of them there). `nonce` restores OpenSSL's counter from ours after a packet not consumed. */
static int gcm_restore(Gcm *g) {
    unsigned char iv[12];
    nonce(g, iv);
    return EVP_CIPHER_CTX_ctrl(g->ctx, EVP_CTRL_GCM_SET_IV_FIXED, -1, iv) == 1;
}

static int gcm_open(Gcm *g, const unsigned char *len4, const unsigned char *ct, int n, unsigned char *plain) {
    unsigned char last;
    if (EVP_CIPHER_CTX_ctrl(g->ctx, EVP_CTRL_GCM_IV_GEN, 1, &last) != 1) return 0;
    if (EVP_CIPHER_CTX_ctrl(g->ctx, EVP_CTRL_GCM_SET_TAG, TAG, (void *)(ct + n)) != 1
            || EVP_Cipher(g->ctx, NULL, len4, 4) < 0 || EVP_Cipher(g->ctx, plain, ct, n) < 0
            || EVP_Cipher(g->ctx, NULL, NULL, 0) < 0) {
        gcm_restore(g);  /* not consumed: the same nonce opens whatever asyncssh is handed */
        return 0;
    }
    return 1;
}

static int gcm_seal(Gcm *g, unsigned char *pkt, int n) {
    unsigned char last;
    if (EVP_CIPHER_CTX_ctrl(g->ctx, EVP_CTRL_GCM_IV_GEN, 1, &last) != 1
            || EVP_Cipher(g->ctx, NULL, pkt, 4) < 0 || EVP_Cipher(g->ctx, pkt + 4, pkt + 4, n) < 0
            || EVP_Cipher(g->ctx, NULL, NULL, 0) < 0
            || EVP_CIPHER_CTX_ctrl(g->ctx, EVP_CTRL_GCM_GET_TAG, TAG, pkt + 4 + n) != 1)
        return 0;
    g->counter++;
    return 1;
}
#else
static int gcm_restore(Gcm *g) { return 1; }  /* the nonce is set per packet from our counter */

/* Open one packet: `len4` the 4-byte length (associated data), `ct` n bytes, then the tag. */
static int gcm_open(Gcm *g, const unsigned char *len4, const unsigned char *ct, int n, unsigned char *plain) {
    unsigned char iv[12];
    int outl;
    nonce(g, iv);
    if (EVP_DecryptInit_ex(g->ctx, NULL, NULL, NULL, iv) != 1
            || EVP_DecryptUpdate(g->ctx, NULL, &outl, len4, 4) != 1
            || EVP_DecryptUpdate(g->ctx, plain, &outl, ct, n) != 1
            || EVP_CIPHER_CTX_ctrl(g->ctx, EVP_CTRL_GCM_SET_TAG, TAG, (void *)(ct + n)) != 1
            || EVP_DecryptFinal_ex(g->ctx, plain + outl, &outl) != 1)
        return 0;
    return 1;
}

/* Seal in place: pkt[0..4) the length (associated data), then n bytes, then room for the tag. */
static int gcm_seal(Gcm *g, unsigned char *pkt, int n) {
    unsigned char iv[12];
    int outl;
    nonce(g, iv);
    if (EVP_EncryptInit_ex(g->ctx, NULL, NULL, NULL, iv) != 1
            || EVP_EncryptUpdate(g->ctx, NULL, &outl, pkt, 4) != 1
            || EVP_EncryptUpdate(g->ctx, pkt + 4, &outl, pkt + 4, n) != 1
            || EVP_EncryptFinal_ex(g->ctx, pkt + 4 + outl, &outl) != 1
            || EVP_CIPHER_CTX_ctrl(g->ctx, EVP_CTRL_GCM_GET_TAG, TAG, pkt + 4 + n) != 1)
        return 0;
    g->counter++;
    return 1;
}
#endif

/* The sealed size of one CHANNEL_DATA packet of `size` bytes, and its padding. */
static Py_ssize_t packet_size(Py_ssize_t size, int *padlen) {
    int pad = (int)(-(1 + 9 + size) & (BLOCK - 1)); /* RFC 4253 6: whole blocks, at least four bytes */
    if (pad < MIN_PAD) pad += BLOCK;
    *padlen = pad;
    return 4 + 1 + 9 + size + pad + TAG;
}

/* Seal `size` bytes for channel c at `to` (room: packet_size); 0 on an OpenSSL failure. */
static int seal_data(Conn *self, Chan *c, const unsigned char *data, Py_ssize_t size, unsigned char *to,
                     Py_ssize_t *written) {
    int padlen;
    Py_ssize_t total = packet_size(size, &padlen);
    uint32_t pktlen = (uint32_t)(total - 4 - TAG);
    put_u32(to, pktlen);
    to[4] = (unsigned char)padlen;
    to[5] = MSG_CHANNEL_DATA;
    put_u32(to + 6, c->send_chan);
    put_u32(to + 10, (uint32_t)size);
    memcpy(to + 14, data, size);
    if (!take_padding(to + 14 + size, padlen) || !gcm_seal(&self->tx, to, (int)pktlen)) return 0;
    self->send_seq++;
    self->rekey_bytes_sent += pktlen;
    *written = total;
    return 1;
}

static int may_send(Conn *self, Chan *c, Py_ssize_t size) {
    return self->send_ok && c->ok && self->rekey_bytes_sent < self->rekey_bytes && size <= c->send_window
        && size <= c->send_pktsize;
}

static void Conn_dealloc(Conn *self) {
    EVP_CIPHER_CTX_free(self->rx.ctx);
    EVP_CIPHER_CTX_free(self->tx.ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Conn_init(Conn *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"recv_key", "recv_iv", "send_key", "send_iv", "max_recv_pktlen", "recv_seq",
                            "send_seq", NULL};
    Py_buffer rk, ri, sk, si;
    unsigned int maxlen, rseq = 0, sseq = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*y*y*I|II", names, &rk, &ri, &sk, &si, &maxlen, &rseq, &sseq))
        return -1;
    int ok = ri.len == 12 && si.len == 12 && gcm_init(&self->rx, rk.buf, rk.len, ri.buf, 0)
        && gcm_init(&self->tx, sk.buf, sk.len, si.buf, 1);
    PyBuffer_Release(&rk); PyBuffer_Release(&ri); PyBuffer_Release(&sk); PyBuffer_Release(&si);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "AES-GCM needs a 16 or 32-byte key and a 12-byte nonce");
        return -1;
    }
    self->max_recv_pktlen = maxlen;
    self->recv_seq = rseq;
    self->send_seq = sseq;
    self->rekey_bytes = (uint64_t)1 << 40;
    self->send_ok = 1;
    self->adjust = -1;
    return 0;
}

static PyObject *Conn_add_channel(Conn *self, PyObject *args) {
    Chan c = {0};
    c.link = -1;
    if (!PyArg_ParseTuple(args, "IIIIII|i", &c.recv_chan, &c.send_chan, &c.recv_window, &c.init_recv_window,
                          &c.send_window, &c.send_pktsize, &c.link))
        return NULL;
    if (self->nchans == MAXCHAN) {
        PyErr_SetString(PyExc_OverflowError, "too many channels on the fast path");
        return NULL;
    }
    c.ok = 1;
    self->chans[self->nchans] = c;
    return PyLong_FromLong(self->nchans++);
}

/* receive(data, out=None) -> bytes: see the top of the file. */
static PyObject *Conn_receive(Conn *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "receive(data, out=None)");
        return NULL;
    }
    Conn *out = NULL;
    if (nargs == 2 && args[1] != Py_None) {
        if (Py_TYPE(args[1]) != Py_TYPE(self)) {
            PyErr_SetString(PyExc_TypeError, "out must be a Conn");
            return NULL;
        }
        out = (Conn *)args[1];
    }
    Py_buffer in;
    if (PyObject_GetBuffer(args[0], &in, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = in.buf;
    Py_ssize_t len = in.len, pos = 0, outpos = 0;
    /* A sealed packet is at least 36 bytes and its re-sealed form at most 16 more (padding): room for all. */
    Py_ssize_t cap = len + TAG * (len / 36 + 1);
    PyObject *result = PyBytes_FromStringAndSize(NULL, cap);
    unsigned char stack_plain[STACK_PLAIN], *heap_plain = NULL;
    int failed = 0, rewind = 0;  /* rewind: a packet opened and then left to asyncssh (its nonce is unused) */
    if (result == NULL) { PyBuffer_Release(&in); return NULL; }
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(result);
    self->adjust = -1;
    while (len - pos >= 4) {
        uint32_t pktlen = get_u32(buf + pos);
        if (pktlen > self->max_recv_pktlen || pktlen < BLOCK || pktlen % BLOCK) break;  /* asyncssh judges it */
        if ((Py_ssize_t)pktlen + 4 + TAG > len - pos) break;  /* partial */
        unsigned char *plain = stack_plain;
        if (pktlen > STACK_PLAIN) {
            heap_plain = PyMem_Realloc(heap_plain, pktlen);
            if (heap_plain == NULL) { PyErr_NoMemory(); failed = 1; break; }
            plain = heap_plain;
        }
        if (!gcm_open(&self->rx, buf + pos, buf + pos + 4, (int)pktlen, plain)) break;  /* a failed tag */
        rewind = 1;
        unsigned padlen = plain[0];
        if (padlen < MIN_PAD || pktlen < 10 + padlen || plain[1] != MSG_CHANNEL_DATA) break;
        Py_ssize_t stop = pktlen - padlen;
        uint32_t recipient = get_u32(plain + 2), size = get_u32(plain + 6);
        Chan *c = NULL;
        for (int i = 0; i < self->nchans; i++)
            if (self->chans[i].recv_chan == recipient) { c = &self->chans[i]; break; }
        if (c == NULL || !c->ok || (Py_ssize_t)size + 10 != stop || size == 0 || size > c->recv_window) break;
        Chan *oc = NULL;
        if (out != NULL) {
            if (c->link < 0 || c->link >= out->nchans) break;
            oc = &out->chans[c->link];
            if (!may_send(out, oc, size)) break;
        }
        /* Consumed: the state asyncssh would leave after this packet. */
        rewind = 0;
        self->rx.counter++;
        self->recv_seq++;
        self->relayed++;
        pos += 4 + (Py_ssize_t)pktlen + TAG;
        c->recv_window -= size;
        if (out != NULL) {
            Py_ssize_t written;
            if (!seal_data(out, oc, plain + 10, size, dst + outpos, &written)) { failed = 1; break; }
            oc->send_window -= size;
            outpos += written;
        } else {
            memcpy(dst + outpos, plain + 10, size);
            outpos += size;
        }
        if (c->recv_window < c->init_recv_window / 2) {
            self->adjust = (int)(c - self->chans);  /* the caller sends the WINDOW_ADJUST: its turn now */
            break;
        }
    }
    PyMem_Free(heap_plain);
    PyBuffer_Release(&in);
    self->consumed = pos;
    if (rewind && !gcm_restore(&self->rx) && !failed) {
        failed = 1;
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to set the nonce");
    }
    if (failed) {
        Py_DECREF(result);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to seal a packet");
        return NULL;
    }
    if (_PyBytes_Resize(&result, outpos) < 0) return NULL;
    return result;
}

/* send(index, data) -> bytes | None */
static PyObject *Conn_send(Conn *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send(index, data)");
        return NULL;
    }
    long index = PyLong_AsLong(args[0]);
    if (index == -1 && PyErr_Occurred()) return NULL;
    if (index < 0 || index >= self->nchans) {
        PyErr_SetString(PyExc_IndexError, "no such channel");
        return NULL;
    }
    Chan *c = &self->chans[index];
    Py_buffer in;
    if (PyObject_GetBuffer(args[1], &in, PyBUF_SIMPLE) < 0) return NULL;
    if (in.len == 0 || !may_send(self, c, in.len)) {
        PyBuffer_Release(&in);
        Py_RETURN_NONE;
    }
    int padlen;
    PyObject *result = PyBytes_FromStringAndSize(NULL, packet_size(in.len, &padlen));
    Py_ssize_t written;
    if (result == NULL || !seal_data(self, c, in.buf, in.len, (unsigned char *)PyBytes_AS_STRING(result), &written)) {
        PyBuffer_Release(&in);
        Py_XDECREF(result);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to seal a packet");
        return NULL;
    }
    c->send_window -= (uint32_t)in.len;
    PyBuffer_Release(&in);
    return result;
}

static PyObject *Conn_state(Conn *self, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("{s:K,s:K,s:I,s:I,s:K,s:K}", "recv_counter", (unsigned long long)self->rx.counter,
                         "send_counter", (unsigned long long)self->tx.counter, "recv_seq", self->recv_seq,
                         "send_seq", self->send_seq, "rekey_bytes_sent", (unsigned long long)self->rekey_bytes_sent,
                         "relayed", self->relayed);
}

static PyMethodDef Conn_methods[] = {
    {"receive", (PyCFunction)(void (*)(void))Conn_receive, METH_FASTCALL, "Relay or deliver whole data packets."},
    {"send", (PyCFunction)(void (*)(void))Conn_send, METH_FASTCALL, "Seal data as CHANNEL_DATA packets."},
    {"add_channel", (PyCFunction)Conn_add_channel, METH_VARARGS, "Add a channel; its index."},
    {"state", (PyCFunction)Conn_state, METH_NOARGS, "Counters and sequence numbers, for syncing back."},
    {NULL}
};

static PyObject *Conn_get_consumed(Conn *self, void *closure) { return PyLong_FromSsize_t(self->consumed); }
static PyObject *Conn_get_adjust(Conn *self, void *closure) { return PyLong_FromLong(self->adjust); }

static PyGetSetDef Conn_getset[] = {
    {"consumed", (getter)Conn_get_consumed, NULL, "bytes of the last receive's data taken", NULL},
    {"adjust", (getter)Conn_get_adjust, NULL, "channel owed a WINDOW_ADJUST after the last receive, or -1", NULL},
    {NULL}
};

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_fastpacket.Conn",
    .tp_basicsize = sizeof(Conn),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Conn_init,
    .tp_dealloc = (destructor)Conn_dealloc,
    .tp_methods = Conn_methods,
    .tp_getset = Conn_getset,
};

/* Under `valgrind --tool=callgrind --collect-atstart=no`, count only between two calls (the timed steps). */
static PyObject *toggle_collect(PyObject *m, PyObject *Py_UNUSED(ignored)) {
    CALLGRIND_TOGGLE_COLLECT;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"toggle_collect", toggle_collect, METH_NOARGS, "Toggle callgrind's collection (a no-op elsewhere)."},
    {NULL}
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpacket", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__fastpacket(void) {
    if (PyType_Ready(&ConnType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&ConnType);
    if (PyModule_AddObject(m, "Conn", (PyObject *)&ConnType) < 0) { Py_DECREF(&ConnType); Py_DECREF(m); return NULL; }
    return m;
}
