/*
 * envfs._signer: the thread that derives file keys ahead, in C.
 *
 * A file key is HMAC-SHA256(master key, message) computed by the token: a
 * C_SignInit (the key) and a C_Sign (the message), each a round trip to the
 * token. The daemon derives the key of the file it expects next while it
 * serves other requests. From a Python thread, every return from a PKCS#11
 * call took the GIL back from the thread serving FUSE requests, which paid
 * for each hand-over (a futex wake-up, often a context switch) several times
 * per key. This thread calls the module's C_SignInit and C_Sign itself and
 * never takes the GIL: Python queues a message, and later copies the 32-byte
 * result out of a locked, non-dumpable page, which is wiped at once.
 *
 * After each key the thread starts the next operation (C_SignInit on the same
 * key), so the next derivation needs only C_Sign. The session is lent: the
 * owner (envfs.hsm.Hsm) pauses the thread before it uses the session itself,
 * and gets back the key of an operation left started, if any.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SLOTS 8           /* jobs queued, running or waiting to be collected */
#define RESULT_SIZE 32    /* HMAC-SHA256 */
#define MAX_MESSAGE 256
#define CKR_OK 0UL
#define CKR_FUNCTION_CANCELED 0x50UL
#define CKR_VENDOR_DEFINED 0x80000000UL /* C_Sign returned a length other than 32 */
#define CKM_SHA256_HMAC 0x251UL
#define STACK_SIZE (256 * 1024) /* the daemon locks all its memory: keep the stack small */

typedef unsigned long CK_ULONG;
typedef struct {
    CK_ULONG mechanism;
    void *parameter;
    CK_ULONG parameter_len;
} Mechanism;
typedef CK_ULONG (*SignInitFn)(CK_ULONG session, Mechanism *mechanism, CK_ULONG key);
typedef CK_ULONG (*SignFn)(CK_ULONG session, unsigned char *data, CK_ULONG data_len, unsigned char *signature,
                           CK_ULONG *signature_len);

enum { FREE, QUEUED, RUNNING, DONE, ABANDONED };

typedef struct {
    int state;
    int arm_only; /* start an operation on `key`, derive nothing */
    unsigned long long ticket;
    CK_ULONG key;
    unsigned char message[MAX_MESSAGE];
    CK_ULONG message_len;
    CK_ULONG rv;
} Job;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_cond_t work; /* the thread waits for a job, a resume or the close */
    pthread_cond_t done; /* callers wait for a job, or for the thread to be idle */
    pthread_t thread;
    int started, closing, paused, busy;
    int waiting; /* the thread sleeps on `work` */
    SignInitFn sign_init;
    SignFn sign;
    CK_ULONG session;
    CK_ULONG armed; /* key of the operation started on the session; 0: none */
    unsigned long long next_ticket;
    Job jobs[SLOTS];
    unsigned char *results; /* RESULT_SIZE per slot, in a locked, non-dumpable page */
    size_t results_size;
} Signer;

static Mechanism hmac_mechanism = {CKM_SHA256_HMAC, NULL, 0};

static Job *oldest_queued(Signer *self) {
    Job *oldest = NULL;
    for (int i = 0; i < SLOTS; i++)
        if (self->jobs[i].state == QUEUED && (!oldest || self->jobs[i].ticket < oldest->ticket))
            oldest = &self->jobs[i];
    return oldest;
}

static Job *find(Signer *self, unsigned long long ticket) {
    for (int i = 0; i < SLOTS; i++)
        if (self->jobs[i].state != FREE && self->jobs[i].ticket == ticket)
            return &self->jobs[i];
    return NULL;
}

static unsigned char *result_of(Signer *self, Job *job) {
    return self->results + (job - self->jobs) * RESULT_SIZE;
}

static void release(Signer *self, Job *job) {
    explicit_bzero(result_of(self, job), RESULT_SIZE);
    job->state = FREE;
}

/* Outside the lock: the PKCS#11 calls of one job, on the session state given. */
static CK_ULONG run(SignInitFn sign_init, SignFn sign, CK_ULONG session, CK_ULONG *armed, const Job *job,
                    unsigned char *out) {
    CK_ULONG rv = CKR_OK;
    if (*armed != job->key) {
        if (*armed) {
            /* An operation on another key (a rotation uses two): a session runs one at a
               time, and only a C_Sign ends it. */
            unsigned char scratch[RESULT_SIZE];
            CK_ULONG length = RESULT_SIZE;
            sign(session, (unsigned char *)"", 0, scratch, &length);
            explicit_bzero(scratch, sizeof scratch);
            *armed = 0;
        }
        rv = sign_init(session, &hmac_mechanism, job->key);
        if (rv != CKR_OK)
            return rv;
        *armed = job->key;
    }
    if (job->arm_only)
        return CKR_OK;
    CK_ULONG length = RESULT_SIZE;
    *armed = 0; /* C_Sign ends the operation, whatever it returns */
    rv = sign(session, (unsigned char *)job->message, job->message_len, out, &length);
    if (rv == CKR_OK && length != RESULT_SIZE)
        rv = CKR_VENDOR_DEFINED;
    if (rv != CKR_OK)
        explicit_bzero(out, RESULT_SIZE);
    return rv;
}

static void *worker(void *arg) {
    Signer *self = arg;
    /* Without wake-up preemption: woken by a submit, the thread would otherwise take the
       submitter's CPU at once, and the request being served would wait for its round trip
       to the token to begin. */
    struct sched_param batch = {0};
    pthread_setschedparam(pthread_self(), SCHED_BATCH, &batch);
    pthread_mutex_lock(&self->lock);
    for (;;) {
        Job *job = NULL;
        while (!self->closing && (self->paused || !(job = oldest_queued(self)))) {
            self->waiting = 1;
            pthread_cond_wait(&self->work, &self->lock);
            self->waiting = 0;
        }
        if (self->closing)
            break;
        job->state = RUNNING;
        self->busy = 1;
        SignInitFn sign_init = self->sign_init;
        SignFn sign = self->sign;
        CK_ULONG session = self->session, armed = self->armed;
        unsigned char *out = result_of(self, job);
        pthread_mutex_unlock(&self->lock);

        CK_ULONG rv = run(sign_init, sign, session, &armed, job, out);

        pthread_mutex_lock(&self->lock);
        job->rv = rv;
        int derived = !job->arm_only && rv == CKR_OK;
        if (job->arm_only || job->state == ABANDONED)
            release(self, job);
        else
            job->state = DONE;
        pthread_cond_broadcast(&self->done);
        if (derived && !self->paused && !self->closing) {
            /* The next derivation will most likely use the same key: start it now. */
            CK_ULONG key = job->key;
            pthread_mutex_unlock(&self->lock);
            if (sign_init(session, &hmac_mechanism, key) == CKR_OK)
                armed = key;
            pthread_mutex_lock(&self->lock);
        }
        self->armed = armed;
        self->busy = 0;
        pthread_cond_broadcast(&self->done);
    }
    pthread_mutex_unlock(&self->lock);
    return NULL;
}

/* With the lock held and the GIL released: wait until the thread runs no job. */
static void wait_idle(Signer *self) {
    while (self->busy)
        pthread_cond_wait(&self->done, &self->lock);
}

static int Signer_init(Signer *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "", kwlist))
        return -1;
    if (self->results) {
        PyErr_SetString(PyExc_RuntimeError, "Signer already initialised");
        return -1;
    }
    self->results_size = (size_t)sysconf(_SC_PAGESIZE);
    void *page = mmap(NULL, self->results_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (mlock(page, self->results_size) != 0 || madvise(page, self->results_size, MADV_DONTDUMP) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        munmap(page, self->results_size);
        return -1;
    }
    self->results = page;
    pthread_mutex_init(&self->lock, NULL);
    pthread_cond_init(&self->work, NULL);
    pthread_cond_init(&self->done, NULL);
    self->paused = 1; /* until resume() lends it a session */
    self->next_ticket = 1;
    return 0;
}

static void stop(Signer *self) {
    if (!self->results)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    self->closing = 1;
    pthread_cond_broadcast(&self->work);
    pthread_mutex_unlock(&self->lock);
    if (self->started)
        pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    self->started = 0;
    for (int i = 0; i < SLOTS; i++)
        self->jobs[i].state = FREE;
    explicit_bzero(self->results, self->results_size);
}

static PyObject *Signer_close(Signer *self, PyObject *unused) {
    stop(self);
    Py_RETURN_NONE;
}

static void Signer_dealloc(Signer *self) {
    stop(self);
    if (self->results) {
        munmap(self->results, self->results_size);
        self->results = NULL;
        pthread_mutex_destroy(&self->lock);
        pthread_cond_destroy(&self->work);
        pthread_cond_destroy(&self->done);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_open(Signer *self) {
    if (!self->results || self->closing) {
        PyErr_SetString(PyExc_ValueError, "the Signer is closed");
        return -1;
    }
    return 0;
}

static PyObject *Signer_resume(Signer *self, PyObject *args) {
    unsigned long long sign_init, sign;
    unsigned long session, armed;
    if (!PyArg_ParseTuple(args, "KKkk", &sign_init, &sign, &session, &armed) || check_open(self))
        return NULL;
    if (!sign_init || !sign) {
        PyErr_SetString(PyExc_ValueError, "C_SignInit and C_Sign must not be NULL");
        return NULL;
    }
    pthread_mutex_lock(&self->lock);
    self->sign_init = (SignInitFn)(uintptr_t)sign_init;
    self->sign = (SignFn)(uintptr_t)sign;
    self->session = session;
    self->armed = armed;
    self->paused = 0;
    if (!self->started) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, STACK_SIZE);
        self->started = pthread_create(&self->thread, &attr, worker, self) == 0;
        pthread_attr_destroy(&attr);
    }
    int started = self->started;
    if (!started)
        self->paused = 1;
    pthread_cond_broadcast(&self->work);
    pthread_mutex_unlock(&self->lock);
    if (!started)
        return PyErr_Format(PyExc_OSError, "cannot start the key thread");
    Py_RETURN_NONE;
}

static PyObject *Signer_pause(Signer *self, PyObject *unused) {
    CK_ULONG armed;
    if (check_open(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    self->paused = 1;
    wait_idle(self);
    armed = self->armed;
    self->armed = 0;
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong(armed);
}

static PyObject *queue(Signer *self, CK_ULONG key, const char *message, Py_ssize_t length, int arm_only) {
    pthread_mutex_lock(&self->lock);
    Job *job = NULL;
    for (int i = 0; i < SLOTS && !job; i++)
        if (self->jobs[i].state == FREE)
            job = &self->jobs[i];
    if (!job) {
        pthread_mutex_unlock(&self->lock);
        PyErr_SetString(PyExc_BufferError, "the key thread's queue is full");
        return NULL;
    }
    job->state = QUEUED;
    job->arm_only = arm_only;
    job->key = key;
    job->ticket = self->next_ticket++;
    memcpy(job->message, message, (size_t)length);
    job->message_len = (CK_ULONG)length;
    unsigned long long ticket = job->ticket;
    int wake = self->waiting && !self->paused;
    pthread_mutex_unlock(&self->lock);
    /* After the unlock: a thread woken inside it would at once wait for the lock, and be
       woken a second time. A thread at work finds the job before it sleeps again. Waking
       a thread is what a submit costs (on a virtual machine, tens of microseconds). */
    if (wake)
        pthread_cond_signal(&self->work);
    return PyLong_FromUnsignedLongLong(ticket);
}

static PyObject *Signer_submit(Signer *self, PyObject *args) {
    unsigned long key;
    const char *message;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "ky#", &key, &message, &length) || check_open(self))
        return NULL;
    if (length > MAX_MESSAGE)
        return PyErr_Format(PyExc_ValueError, "message longer than %d bytes", MAX_MESSAGE);
    return queue(self, key, message, length, 0);
}

static PyObject *Signer_arm(Signer *self, PyObject *args) {
    unsigned long key;
    if (!PyArg_ParseTuple(args, "k", &key) || check_open(self))
        return NULL;
    pthread_mutex_lock(&self->lock);
    /* Nothing to start ahead if a job will start it, or it is started already. */
    int needless = self->armed == key || oldest_queued(self) != NULL || self->busy;
    pthread_mutex_unlock(&self->lock);
    if (needless)
        Py_RETURN_FALSE;
    PyObject *ticket = queue(self, key, "", 0, 1);
    if (!ticket)
        return NULL;
    Py_DECREF(ticket);
    Py_RETURN_TRUE;
}

static PyObject *Signer_collect(Signer *self, PyObject *args) {
    unsigned long long ticket;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "Kw*", &ticket, &out))
        return NULL;
    if (check_open(self) || out.len != RESULT_SIZE) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "the result buffer must be %d bytes", RESULT_SIZE);
        PyBuffer_Release(&out);
        return NULL;
    }
    CK_ULONG rv;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    Job *job = find(self, ticket);
    while (job && (job->state == RUNNING || (job->state == QUEUED && !self->paused)))
        pthread_cond_wait(&self->done, &self->lock);
    if (!job || job->state == ABANDONED) {
        rv = CKR_FUNCTION_CANCELED;
    } else if (job->state == QUEUED) {
        rv = CKR_FUNCTION_CANCELED; /* the session is not lent: nothing would run it */
        release(self, job);
    } else {
        rv = job->rv;
        if (rv == CKR_OK)
            memcpy(out.buf, result_of(self, job), RESULT_SIZE);
        release(self, job);
    }
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    return PyLong_FromUnsignedLong(rv);
}

static PyObject *Signer_done(Signer *self, PyObject *args) {
    unsigned long long ticket;
    if (!PyArg_ParseTuple(args, "K", &ticket) || check_open(self))
        return NULL;
    pthread_mutex_lock(&self->lock);
    Job *job = find(self, ticket);
    int waits = job && (job->state == RUNNING || (job->state == QUEUED && !self->paused));
    pthread_mutex_unlock(&self->lock);
    return PyBool_FromLong(!waits);
}

/* With the lock held: drop a job; a running one's result is wiped by the thread when it is done. */
static void cancel(Signer *self, Job *job) {
    if (job->state == RUNNING)
        job->state = ABANDONED;
    else if (job->state != FREE && job->state != ABANDONED)
        release(self, job);
}

static PyObject *Signer_cancel(Signer *self, PyObject *args) {
    unsigned long long ticket;
    if (!PyArg_ParseTuple(args, "K", &ticket) || check_open(self))
        return NULL;
    pthread_mutex_lock(&self->lock);
    Job *job = find(self, ticket);
    if (job)
        cancel(self, job);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *Signer_cancel_all(Signer *self, PyObject *unused) {
    if (check_open(self))
        return NULL;
    pthread_mutex_lock(&self->lock);
    for (int i = 0; i < SLOTS; i++)
        cancel(self, &self->jobs[i]);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyMethodDef Signer_methods[] = {
    {"resume", (PyCFunction)Signer_resume, METH_VARARGS,
     "resume(c_sign_init, c_sign, session, armed): lend the thread a session (addresses of the module's functions; "
     "armed: the key of an operation started on it, or 0) and let it run"},
    {"pause", (PyCFunction)Signer_pause, METH_NOARGS,
     "pause() -> armed: wait until the thread runs nothing and take the session back; returns the key of the "
     "operation left started on it, or 0. Queued jobs wait for the next resume."},
    {"submit", (PyCFunction)Signer_submit, METH_VARARGS,
     "submit(key, message) -> ticket: queue HMAC(key, message); BufferError when the queue is full"},
    {"arm", (PyCFunction)Signer_arm, METH_VARARGS,
     "arm(key) -> bool: start an operation on key ahead, unless one is started or a job will start it"},
    {"collect", (PyCFunction)Signer_collect, METH_VARARGS,
     "collect(ticket, out) -> rv: wait for the job, copy its 32 bytes into out when rv is 0, wipe and free it; "
     "CKR_FUNCTION_CANCELED for a ticket cancelled, unknown, or queued while paused"},
    {"done", (PyCFunction)Signer_done, METH_VARARGS,
     "done(ticket) -> bool: whether collect(ticket) would return without waiting for the thread"},
    {"cancel", (PyCFunction)Signer_cancel, METH_VARARGS, "cancel(ticket): drop the job; its result is wiped"},
    {"cancel_all", (PyCFunction)Signer_cancel_all, METH_NOARGS, "cancel_all(): cancel every job"},
    {"close", (PyCFunction)Signer_close, METH_NOARGS, "close(): stop the thread and wipe every result"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SignerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "envfs._signer.Signer",
    .tp_doc = "A thread that runs a PKCS#11 session's HMAC derivations without the GIL.",
    .tp_basicsize = sizeof(Signer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Signer_init,
    .tp_dealloc = (destructor)Signer_dealloc,
    .tp_methods = Signer_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "envfs._signer", "HMAC derivations on a PKCS#11 session, in a thread of C.", -1, NULL,
};

PyMODINIT_FUNC PyInit__signer(void) {
    if (PyType_Ready(&SignerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&SignerType);
    if (PyModule_AddObject(m, "Signer", (PyObject *)&SignerType) < 0) {
        Py_DECREF(&SignerType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "CKR_FUNCTION_CANCELED", (long)CKR_FUNCTION_CANCELED) < 0 ||
        PyModule_AddIntConstant(m, "CKR_LENGTH_WRONG", (long)CKR_VENDOR_DEFINED) < 0 ||
        PyModule_AddIntConstant(m, "RESULT_SIZE", RESULT_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
