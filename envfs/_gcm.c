/*
 * envfs._gcm: AES-256-GCM over runs of envfs blocks, one call per request.
 *
 * `cryptography`'s AESGCM costs about 3.5 us of set-up per call whatever the
 * input size, and holds the GIL for inputs under 32 KiB; at one call per
 * 4096-byte block that set-up, not the cipher, bounded envfs's sequential
 * throughput (docs/PERFORMANCE.md). This module keeps one OpenSSL context per
 * direction with the key schedule in it, changes only the IV per block, and
 * runs a request's blocks in one loop without the GIL. It is glue around
 * OpenSSL's EVP interface and implements no cryptography itself; the layout it
 * reads and writes is the slot layout of docs/FORMAT.md:
 *
 *     slot = nonce (12) || ciphertext (n) || tag (16),  AAD = prefix (33) || index (u64 BE)
 *
 * and a slot of zero bytes only is a hole (plaintext zeros). The key is
 * copied into the contexts only; EVP_CIPHER_CTX_free cleanses them.
 *
 * A run of SPLIT_MIN blocks or more is cut in two: one helper thread (one for
 * the process, started on first use) takes the first half with its own pair
 * of contexts while the caller does the second, so a 1 MiB request uses both
 * cores of a small machine. Only one run at a time uses the helper; another
 * caller meanwhile does its whole run itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <string.h>

#define BLOCK_SIZE 4096
#define NONCE_SIZE 12
#define TAG_SIZE 16
#define OVERHEAD (NONCE_SIZE + TAG_SIZE)
#define SLOT_SIZE (BLOCK_SIZE + OVERHEAD)
#define PREFIX_SIZE 33
#define AAD_SIZE (PREFIX_SIZE + 8)
#define SPLIT_MIN 32                      /* blocks: below, waking the helper costs more than it saves */
#define HELPER_STACK_SIZE (256 * 1024)   /* the daemon locks all its memory: keep the stack small */

static const unsigned char zero_slot[SLOT_SIZE];

/* One direction's context and AAD buffer; the caller and the helper have one each. */
typedef struct {
    EVP_CIPHER_CTX *ctx;
    unsigned char aad[AAD_SIZE];
} Lane;

typedef struct {
    PyObject_HEAD
    Lane seal[2]; /* [0]: the caller's; [1]: the helper's, copied from [0] at the first long run */
    Lane open[2];
    int busy; /* set while a call runs without the GIL: one caller at a time */
} Gcm;

static void put_index(unsigned char *aad, unsigned long long index) {
    for (int i = 7; i >= 0; i--) {
        aad[PREFIX_SIZE + i] = (unsigned char)(index & 0xff);
        index >>= 8;
    }
}

static void gcm_free_contexts(Gcm *self) {
    for (int i = 0; i < 2; i++) {
        EVP_CIPHER_CTX_free(self->seal[i].ctx);
        EVP_CIPHER_CTX_free(self->open[i].ctx);
        self->seal[i].ctx = self->open[i].ctx = NULL;
    }
}

static int Gcm_init(Gcm *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", "aad_prefix", NULL};
    Py_buffer key, prefix;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*", kwlist, &key, &prefix))
        return -1;
    int rc = -1;
    if (key.len != 32 || prefix.len != PREFIX_SIZE) {
        PyErr_Format(PyExc_ValueError, "want a 32-byte key and a %d-byte AAD prefix", PREFIX_SIZE);
        goto out;
    }
    gcm_free_contexts(self);
    self->seal[0].ctx = EVP_CIPHER_CTX_new();
    self->open[0].ctx = EVP_CIPHER_CTX_new();
    if (!self->seal[0].ctx || !self->open[0].ctx ||
        EVP_EncryptInit_ex(self->seal[0].ctx, EVP_aes_256_gcm(), NULL, key.buf, NULL) != 1 ||
        EVP_DecryptInit_ex(self->open[0].ctx, EVP_aes_256_gcm(), NULL, key.buf, NULL) != 1) {
        gcm_free_contexts(self);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up AES-256-GCM");
        goto out;
    }
    memcpy(self->seal[0].aad, prefix.buf, PREFIX_SIZE);
    memcpy(self->open[0].aad, prefix.buf, PREFIX_SIZE);
    rc = 0;
out:
    PyBuffer_Release(&key);
    PyBuffer_Release(&prefix);
    return rc;
}

static void Gcm_dealloc(Gcm *self) {
    gcm_free_contexts(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int take(Gcm *self) {
    if (!self->seal[0].ctx) {
        PyErr_SetString(PyExc_ValueError, "block cipher closed");
        return 0;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "block cipher used by two threads at once");
        return 0;
    }
    self->busy = 1;
    return 1;
}

/* One block: 1 on success, 0 on an OpenSSL failure or (opening) a wrong tag. */
static int seal_block(EVP_CIPHER_CTX *ctx, const unsigned char *aad, const unsigned char *nonce,
                      const unsigned char *in, int n, unsigned char *slot) {
    int len;
    memcpy(slot, nonce, NONCE_SIZE);
    return EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) == 1 &&
           EVP_EncryptUpdate(ctx, NULL, &len, aad, AAD_SIZE) == 1 &&
           EVP_EncryptUpdate(ctx, slot + NONCE_SIZE, &len, in, n) == 1 &&
           EVP_EncryptFinal_ex(ctx, slot + NONCE_SIZE + n, &len) == 1 &&
           EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_SIZE, slot + NONCE_SIZE + n) == 1;
}

static int open_block(EVP_CIPHER_CTX *ctx, const unsigned char *aad, const unsigned char *slot, int n,
                      unsigned char *out) {
    int len;
    unsigned char tag[TAG_SIZE];
    memcpy(tag, slot + NONCE_SIZE + n, TAG_SIZE);
    return EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, slot) == 1 &&
           EVP_DecryptUpdate(ctx, NULL, &len, aad, AAD_SIZE) == 1 &&
           EVP_DecryptUpdate(ctx, out, &len, slot + NONCE_SIZE, n) == 1 &&
           EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_SIZE, tag) == 1 &&
           EVP_DecryptFinal_ex(ctx, out + n, &len) == 1;
}

/* A run of blocks in one direction. Sealing: `in` is plaintext (in_len bytes,
 * 4096-byte blocks, the last possibly shorter), `out` takes the slots. Opening:
 * `in` is slots (in_len bytes, 4124 each, the last possibly shorter), `out`
 * takes 4096-byte blocks. Returns -1, or the first block that failed. */
typedef struct {
    Lane *lane;
    int sealing;
    unsigned long long first;
    const unsigned char *nonces, *in;
    Py_ssize_t in_len;
    unsigned char *out;
} Run;

static Py_ssize_t run_blocks(const Run *r) {
    Py_ssize_t in_block = r->sealing ? BLOCK_SIZE : SLOT_SIZE, out_block = r->sealing ? SLOT_SIZE : BLOCK_SIZE;
    Py_ssize_t count = (r->in_len + in_block - 1) / in_block;
    for (Py_ssize_t k = 0; k < count; k++) {
        const unsigned char *src = r->in + k * in_block;
        unsigned char *dst = r->out + k * out_block;
        Py_ssize_t left = r->in_len - k * in_block;
        int size = left < in_block ? (int)left : (int)in_block;
        put_index(r->lane->aad, r->first + (unsigned long long)k);
        if (r->sealing) {
            if (!seal_block(r->lane->ctx, r->lane->aad, r->nonces + k * NONCE_SIZE, src, size, dst))
                return k;
        } else if (!src[0] && memcmp(src, zero_slot, size) == 0) { /* a non-zero first byte settles most */
            memset(dst, 0, size - OVERHEAD);
        } else if (!open_block(r->lane->ctx, r->lane->aad, src, size - OVERHEAD, dst)) {
            OPENSSL_cleanse(dst, size - OVERHEAD);
            return k;
        }
    }
    return -1;
}

/* The helper thread and the one run it is given at a time. */
static struct {
    pthread_mutex_t use; /* held by the caller whose run the helper shares */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    const Run *run; /* set by the caller, cleared by the helper when done */
    Py_ssize_t failed;
    int started;
} helper = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, -1, 0};

static void *helper_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&helper.lock);
    for (;;) {
        while (!helper.run)
            pthread_cond_wait(&helper.cond, &helper.lock);
        const Run *run = helper.run;
        pthread_mutex_unlock(&helper.lock);
        Py_ssize_t failed = run_blocks(run);
        pthread_mutex_lock(&helper.lock);
        helper.failed = failed;
        helper.run = NULL;
        pthread_cond_broadcast(&helper.cond);
    }
    return NULL;
}

/* A forked child has no helper thread: start afresh with unlocked state. */
static void helper_after_fork(void) {
    pthread_mutex_init(&helper.use, NULL);
    pthread_mutex_init(&helper.lock, NULL);
    pthread_cond_init(&helper.cond, NULL);
    helper.run = NULL;
    helper.started = 0;
}

static int helper_start(void) { /* with helper.use held */
    if (helper.started)
        return 1;
    pthread_attr_t attr;
    pthread_t thread;
    if (pthread_attr_init(&attr) != 0)
        return 0;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, HELPER_STACK_SIZE);
    helper.started = pthread_create(&thread, &attr, helper_main, NULL) == 0;
    pthread_attr_destroy(&attr);
    return helper.started;
}

/* The helper's lane: a copy of the caller's context (the key schedule, not
 * the key), made when first needed; files read or written in small pieces
 * never hold more than the caller's two. */
static Lane *helper_lane(Gcm *self, const Lane *own) {
    Lane *lane = own == &self->seal[0] ? &self->seal[1] : &self->open[1];
    if (!lane->ctx) {
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        if (!ctx || EVP_CIPHER_CTX_copy(ctx, own->ctx) != 1) {
            EVP_CIPHER_CTX_free(ctx);
            return NULL;
        }
        lane->ctx = ctx;
        memcpy(lane->aad, own->aad, PREFIX_SIZE);
    }
    return lane;
}

/* Run `whole` (without the GIL), its first half in the helper when it is long
 * and the helper free; return -1 or the first block that failed. */
static Py_ssize_t run_split(Gcm *self, Run whole) {
    Py_ssize_t in_block = whole.sealing ? BLOCK_SIZE : SLOT_SIZE, out_block = whole.sealing ? SLOT_SIZE : BLOCK_SIZE;
    Py_ssize_t count = (whole.in_len + in_block - 1) / in_block, half = count / 2;
    Lane *lane = count < SPLIT_MIN ? NULL : helper_lane(self, whole.lane);
    if (!lane || pthread_mutex_trylock(&helper.use) != 0)
        return run_blocks(&whole);
    if (!helper_start()) {
        pthread_mutex_unlock(&helper.use);
        return run_blocks(&whole);
    }
    Run first = whole, second = whole;
    first.lane = lane;
    first.in_len = half * in_block;
    second.first += half;
    second.in += half * in_block;
    second.in_len -= half * in_block;
    second.out += half * out_block;
    if (whole.sealing)
        second.nonces += half * NONCE_SIZE;
    pthread_mutex_lock(&helper.lock);
    helper.run = &first;
    pthread_cond_broadcast(&helper.cond);
    pthread_mutex_unlock(&helper.lock);
    Py_ssize_t failed_second = run_blocks(&second);
    pthread_mutex_lock(&helper.lock);
    while (helper.run)
        pthread_cond_wait(&helper.cond, &helper.lock);
    Py_ssize_t failed_first = helper.failed;
    pthread_mutex_unlock(&helper.lock);
    pthread_mutex_unlock(&helper.use);
    if (failed_first >= 0)
        return failed_first;
    return failed_second >= 0 ? half + failed_second : -1;
}

PyDoc_STRVAR(seal_doc,
             "seal(first_index, nonces, plaintext, slots) -> int\n\n"
             "Encrypt plaintext (4096-byte blocks, the last one possibly shorter) into\n"
             "consecutive slots, block k under nonces[12k:12k+12] with the AAD of index\n"
             "first_index + k; return the number of bytes written to slots.");

static PyObject *Gcm_seal(Gcm *self, PyObject *args) {
    unsigned long long first;
    Py_buffer nonces, in, slots;
    if (!PyArg_ParseTuple(args, "Ky*y*w*", &first, &nonces, &in, &slots))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = (in.len + BLOCK_SIZE - 1) / BLOCK_SIZE;
    Py_ssize_t total = in.len + count * OVERHEAD;
    if (nonces.len < count * NONCE_SIZE || slots.len < total) {
        PyErr_SetString(PyExc_ValueError, "nonces or slots too short for the plaintext");
        goto out;
    }
    if (!take(self))
        goto out;
    Run run = {&self->seal[0], 1, first, nonces.buf, in.buf, in.len, slots.buf};
    Py_ssize_t failed;
    Py_BEGIN_ALLOW_THREADS
    failed = run_split(self, run);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (failed >= 0)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to encrypt a block");
    else
        result = PyLong_FromSsize_t(total);
out:
    PyBuffer_Release(&nonces);
    PyBuffer_Release(&in);
    PyBuffer_Release(&slots);
    return result;
}

PyDoc_STRVAR(open_doc,
             "open(first_index, slots, plaintext) -> int\n\n"
             "Authenticate and decrypt consecutive slots (4124 bytes each, the last one\n"
             "possibly shorter) into consecutive 4096-byte blocks of plaintext; an\n"
             "all-zero slot is a hole and gives zeros. Return the plaintext length, or\n"
             "-(k + 1) when slot k fails authentication (its block is zeroed).");

static PyObject *Gcm_open(Gcm *self, PyObject *args) {
    unsigned long long first;
    Py_buffer slots, out;
    if (!PyArg_ParseTuple(args, "Ky*w*", &first, &slots, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = (slots.len + SLOT_SIZE - 1) / SLOT_SIZE;
    if (count && slots.len - (count - 1) * SLOT_SIZE <= OVERHEAD) {
        result = PyLong_FromSsize_t(-count); /* too short to hold a block: not authentic */
        goto out;
    }
    if (out.len < slots.len - count * OVERHEAD) {
        PyErr_SetString(PyExc_ValueError, "plaintext buffer too short for the slots");
        goto out;
    }
    if (!take(self))
        goto out;
    Run run = {&self->open[0], 0, first, NULL, slots.buf, slots.len, out.buf};
    Py_ssize_t failed;
    Py_BEGIN_ALLOW_THREADS
    failed = run_split(self, run);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    result = PyLong_FromSsize_t(failed >= 0 ? -(failed + 1) : slots.len - count * OVERHEAD);
out:
    PyBuffer_Release(&slots);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *Gcm_close(Gcm *self, PyObject *Py_UNUSED(ignored)) {
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "block cipher closed while in use");
        return NULL;
    }
    gcm_free_contexts(self);
    Py_RETURN_NONE;
}

static PyMethodDef Gcm_methods[] = {
    {"seal", (PyCFunction)Gcm_seal, METH_VARARGS, seal_doc},
    {"open", (PyCFunction)Gcm_open, METH_VARARGS, open_doc},
    {"close", (PyCFunction)Gcm_close, METH_NOARGS, "Free the contexts (OpenSSL cleanses the key schedules)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GcmType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "envfs._gcm.Gcm",
    .tp_doc = PyDoc_STR("Gcm(key, aad_prefix): AES-256-GCM of envfs blocks under one key."),
    .tp_basicsize = sizeof(Gcm),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Gcm_init,
    .tp_dealloc = (destructor)Gcm_dealloc,
    .tp_methods = Gcm_methods,
};

static struct PyModuleDef gcm_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "envfs._gcm",
    .m_doc = PyDoc_STR("AES-256-GCM over runs of envfs blocks through OpenSSL, without the GIL."),
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__gcm(void) {
    if (PyType_Ready(&GcmType) < 0)
        return NULL;
    if (pthread_atfork(NULL, NULL, helper_after_fork) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "could not register the helper thread's fork handler");
        return NULL;
    }
    PyObject *m = PyModule_Create(&gcm_module);
    if (!m)
        return NULL;
    Py_INCREF(&GcmType);
    if (PyModule_AddObject(m, "Gcm", (PyObject *)&GcmType) < 0) {
        Py_DECREF(&GcmType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
