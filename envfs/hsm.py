"""The HSM: find token and master keys, derive keys into a `Secret`.

This is the only module that speaks PKCS#11. It has two halves:

- `Hsm` derives keys, and reads and writes the store's anchor (a data
  object, `anchor`). It drives the module's function list directly
  (ctypes), so the HMAC output lands in locked memory (python-pkcs11's
  `sign()` returns a `bytes` and leaves a freed copy of the key behind) and
  the module is initialised with CKF_OS_LOCKING_OK (python-pkcs11 passes NULL,
  under which SoftHSM2 turns its own locking off).
- `HsmAdmin` manages keys through python-pkcs11: generate, import, inspect,
  destroy. Operators' commands use it; the filesystem daemon does not.

An `Hsm` is used from one thread. The keys it derives ahead are computed by
a thread of C (`envfs._signer`) that borrows the session between the owner's
own calls and never takes the GIL.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from . import _signer
from .errors import HsmError, KeyNotFound, PinError, TokenNotFound
from .secret import Secret

log = logging.getLogger(__name__)
T = TypeVar("T")

MASTER_KEY_BYTES = 32
DERIVED_KEY_BYTES = 32

_CK_ULONG = ctypes.c_ulong
_CK_RV = ctypes.c_ulong

_CKR_OK = 0x0
_CKR_PIN_INCORRECT = 0xA0
_CKR_PIN_INVALID = 0xA1
_CKR_PIN_LEN_RANGE = 0xA2
_CKR_PIN_LOCKED = 0xA4
_CKR_USER_ALREADY_LOGGED_IN = 0x100
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
# Return values after which a re-initialise and fresh login may help: the
# token server or network HSM restarted, or our session was dropped.
_CKR_GONE = frozenset({
    0x05,   # GENERAL_ERROR
    0x30,   # DEVICE_ERROR
    0x32,   # DEVICE_REMOVED
    0x60,   # KEY_HANDLE_INVALID
    0x82,   # OBJECT_HANDLE_INVALID
    0xB0,   # SESSION_CLOSED
    0xB3,   # SESSION_HANDLE_INVALID
    0xE0,   # TOKEN_NOT_PRESENT
    0x101,  # USER_NOT_LOGGED_IN
    0x190,  # CRYPTOKI_NOT_INITIALIZED
})  # fmt: skip

_CKF_OS_LOCKING_OK = 0x2
_CKF_RW_SESSION = 0x2
_CKF_SERIAL_SESSION = 0x4
_CKU_SO = 0
_CKU_USER = 1
_CKA_CLASS = 0x0
_CKA_TOKEN = 0x1
_CKA_PRIVATE = 0x2
_CKA_LABEL = 0x3
_CKA_VALUE = 0x11
_CKO_DATA = 0x0
_CKO_SECRET_KEY = 0x4
_CK_TRUE = 1
# Data objects of one label read at most: one is kept, two exist for a moment.
_MAX_DATA_OBJECTS = 8
_CKM_SHA256_HMAC = 0x251


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", _CK_ULONG), ("parameter", ctypes.c_void_p), ("parameter_len", _CK_ULONG)]


class _Attribute(ctypes.Structure):
    _fields_ = [("type", _CK_ULONG), ("value", ctypes.c_void_p), ("value_len", _CK_ULONG)]


class _InitializeArgs(ctypes.Structure):
    _fields_ = [("create_mutex", ctypes.c_void_p), ("destroy_mutex", ctypes.c_void_p),
                ("lock_mutex", ctypes.c_void_p), ("unlock_mutex", ctypes.c_void_p),
                ("flags", _CK_ULONG), ("reserved", ctypes.c_void_p)]  # fmt: skip


class _TokenInfo(ctypes.Structure):
    # CK_TOKEN_INFO begins with the 32-byte blank-padded label; the rest is not read.
    _fields_ = [("label", ctypes.c_char * 32), ("rest", ctypes.c_ubyte * 512)]


# CK_FUNCTION_LIST up to C_Sign, in the order of the PKCS#11 specification.
_FUNCTION_NAMES = [
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
    "C_InitToken", "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession",
    "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState",
    "C_SetOperationState", "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject",
    "C_DestroyObject", "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue",
    "C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal", "C_EncryptInit",
    "C_Encrypt", "C_EncryptUpdate", "C_EncryptFinal", "C_DecryptInit", "C_Decrypt",
    "C_DecryptUpdate", "C_DecryptFinal", "C_DigestInit", "C_Digest", "C_DigestUpdate",
    "C_DigestKey", "C_DigestFinal", "C_SignInit", "C_Sign",
]  # fmt: skip

_P = ctypes.POINTER
_SIGNATURES: dict[str, tuple[Any, ...]] = {
    "C_Initialize": (ctypes.c_void_p,),
    "C_Finalize": (ctypes.c_void_p,),
    "C_GetSlotList": (ctypes.c_ubyte, ctypes.c_void_p, _P(_CK_ULONG)),
    "C_GetTokenInfo": (_CK_ULONG, _P(_TokenInfo)),
    "C_InitToken": (_CK_ULONG, ctypes.c_char_p, _CK_ULONG, ctypes.c_char_p),
    "C_InitPIN": (_CK_ULONG, ctypes.c_char_p, _CK_ULONG),
    "C_OpenSession": (_CK_ULONG, _CK_ULONG, ctypes.c_void_p, ctypes.c_void_p, _P(_CK_ULONG)),
    "C_CloseSession": (_CK_ULONG,),
    "C_Login": (_CK_ULONG, _CK_ULONG, ctypes.c_char_p, _CK_ULONG),
    "C_CreateObject": (_CK_ULONG, _P(_Attribute), _CK_ULONG, _P(_CK_ULONG)),
    "C_DestroyObject": (_CK_ULONG, _CK_ULONG),
    "C_GetAttributeValue": (_CK_ULONG, _CK_ULONG, _P(_Attribute), _CK_ULONG),
    "C_FindObjectsInit": (_CK_ULONG, _P(_Attribute), _CK_ULONG),
    "C_FindObjects": (_CK_ULONG, _P(_CK_ULONG), _CK_ULONG, _P(_CK_ULONG)),
    "C_FindObjectsFinal": (_CK_ULONG,),
    "C_SignInit": (_CK_ULONG, _P(_Mechanism), _CK_ULONG),
    "C_Sign": (_CK_ULONG, ctypes.c_void_p, _CK_ULONG, ctypes.c_void_p, _P(_CK_ULONG)),
}


class _FunctionList(ctypes.Structure):
    _fields_ = [("version", ctypes.c_ubyte * 2)] + [(name, ctypes.c_void_p) for name in _FUNCTION_NAMES]


class _Module:
    """Callable PKCS#11 entry points of one module instance."""

    def __init__(self, module_path: str) -> None:
        self.path = module_path
        try:
            library = ctypes.CDLL(module_path)
        except OSError as e:
            raise HsmError(f"cannot load PKCS#11 module {module_path}: {e}") from e
        pointer = ctypes.POINTER(_FunctionList)()
        rv = library.C_GetFunctionList(ctypes.byref(pointer))
        if rv != _CKR_OK:
            raise HsmError(f"{module_path}: C_GetFunctionList failed (CKR 0x{rv:x})")
        self._library = library  # keeps the library loaded
        self._functions = pointer.contents

    def address(self, name: str) -> int:
        """The address of an entry point, for code in C that calls it."""
        address = getattr(self._functions, name)
        if not address:
            raise HsmError(f"{self.path}: the module does not implement {name}")
        return int(address)

    def __getattr__(self, name: str) -> Callable[..., int]:
        function = ctypes.CFUNCTYPE(_CK_RV, *_SIGNATURES[name])(self.address(name))
        setattr(self, name, function)
        return function

    def call(self, name: str, *args: Any) -> int:
        """Call an entry point and return its CK_RV."""
        return int(getattr(self, name)(*args))

    def check(self, name: str, *args: Any) -> None:
        rv = self.call(name, *args)
        if rv == _CKR_OK:
            return
        if rv in _CKR_GONE:
            raise _TokenGone(f"{name}: CKR 0x{rv:x}")
        raise HsmError(f"{name} failed (CKR 0x{rv:x})")

    def slots_with_label(self, token_label: str) -> list[int]:
        count = _CK_ULONG(0)
        self.check("C_GetSlotList", 1, None, ctypes.byref(count))
        slots = (_CK_ULONG * max(count.value, 1))()
        self.check("C_GetSlotList", 1, slots, ctypes.byref(count))
        wanted = token_label.encode()
        found = []
        for slot in slots[: count.value]:
            info = _TokenInfo()
            if self.call("C_GetTokenInfo", slot, ctypes.byref(info)) == _CKR_OK and info.label.rstrip() == wanted:
                found.append(int(slot))
        return found


class _TokenGone(Exception):
    """The token or our session vanished; a re-initialise may help."""


class Hsm:
    """A logged-in session on one token, used to derive keys.

    The session stays open and logged in for the object's lifetime: closing
    the login session would log the whole application out.

    A derivation is C_SignInit (the key; over p11-kit to SoftHSM2 about
    110 us) then C_Sign (the message; about 60 us). The first does not depend
    on the message, so `arm` runs it ahead, between derivations, and the next
    `derive` with that key pays only for C_Sign. The session then holds an
    active sign operation; anything else it is asked to do finishes that
    operation first (`_disarm`), since a session runs one operation at a time.

    `derive_ahead` queues a derivation for the key thread (`envfs._signer`),
    and `collect` takes its result. The session is lent to that thread
    (`_lend`) whenever it has work, and every call of the owner's own takes
    it back first (`_own`), with the operation the thread left started.
    """

    def __init__(
        self, module_path: str, token_label: str, pin: str, before_reconnect: Callable[[], None] | None = None
    ) -> None:
        self.module_path = module_path
        self.token_label = token_label
        self._pin = pin.encode()
        self._before_reconnect = before_reconnect
        self._module = _Module(module_path)
        self._session: int | None = None
        self._keys: dict[str, int] = {}
        self._armed: int | None = None  # the key handle of the active C_SignInit
        self._ahead: _signer.Signer | None = None  # the key thread, from the first derivation ahead
        self._lent = False  # whether the key thread has the session
        self._connect()

    def _connect(self) -> None:
        args = _InitializeArgs(None, None, None, None, _CKF_OS_LOCKING_OK, None)
        rv = self._module.call("C_Initialize", ctypes.byref(args))
        if rv not in (_CKR_OK, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise HsmError(f"{self.module_path}: C_Initialize failed (CKR 0x{rv:x})")
        try:
            slots = self._module.slots_with_label(self.token_label)
        except _TokenGone as e:
            raise HsmError(f"token {self.token_label!r}: {e}") from e
        if not slots:
            raise TokenNotFound(f"no token labelled {self.token_label!r} in {self.module_path}")
        if len(slots) > 1:
            raise TokenNotFound(f"several tokens labelled {self.token_label!r} in {self.module_path}")
        session = _CK_ULONG(0)
        try:
            self._module.check("C_OpenSession", slots[0], _CKF_SERIAL_SESSION, None, None, ctypes.byref(session))
        except _TokenGone as e:
            raise HsmError(f"token {self.token_label!r}: {e}") from e
        rv = self._module.call("C_Login", session, _CKU_USER, self._pin, len(self._pin))
        if rv in (_CKR_PIN_INCORRECT, _CKR_PIN_INVALID, _CKR_PIN_LEN_RANGE):
            self._module.call("C_CloseSession", session)
            raise PinError(f"token {self.token_label!r}: the PIN was not accepted")
        if rv == _CKR_PIN_LOCKED:
            self._module.call("C_CloseSession", session)
            raise PinError(f"token {self.token_label!r}: the PIN is locked")
        if rv not in (_CKR_OK, _CKR_USER_ALREADY_LOGGED_IN):
            self._module.call("C_CloseSession", session)
            raise HsmError(f"token {self.token_label!r}: C_Login failed (CKR 0x{rv:x})")
        self._session = session.value
        self._keys.clear()
        self._armed = None

    def _own(self) -> None:
        """Take the session back from the key thread, with the operation it left started."""
        if self._lent:
            assert self._ahead is not None
            self._armed = self._ahead.pause() or None
            self._lent = False

    def _lend(self) -> None:
        """Let the key thread use the session for what is queued."""
        if self._ahead is None or self._lent or self._session is None:
            return
        self._ahead.resume(
            self._module.address("C_SignInit"), self._module.address("C_Sign"), self._session, self._armed or 0
        )
        self._armed = None
        self._lent = True

    def reconnect(self) -> None:
        """Re-initialise the module and log in again (a fresh module instance)."""
        log.warning("HSM: reconnecting to token %r", self.token_label)
        self._own()
        if self._ahead is not None:
            # Key handles are the old session's: the same number may name another key now.
            self._ahead.cancel_all()
        self._keys.clear()
        self._session = None
        self._armed = None
        self._module.call("C_Finalize", None)
        if self._before_reconnect is not None:
            self._before_reconnect()
        self._module = _Module(self.module_path)
        self._connect()

    def _key(self, label: str) -> int:
        handle = self._keys.get(label)
        if handle is not None:
            return handle
        self._own()
        self._disarm()
        found = self._find(self._session, _CKO_SECRET_KEY, label)
        if not found:
            raise KeyNotFound(f"no key labelled {label!r} in token {self.token_label!r}")
        if len(found) > 1:
            raise KeyNotFound(f"several keys labelled {label!r} in token {self.token_label!r}")
        self._keys[label] = found[0]
        return found[0]

    def _find(self, session: int | None, object_class: int, label: str, limit: int = 2) -> list[int]:
        """Handles of the objects of `object_class` labelled `label` (at most `limit`)."""
        encoded = label.encode()
        class_value = _CK_ULONG(object_class)
        label_buffer = ctypes.create_string_buffer(encoded, len(encoded))
        template = (_Attribute * 2)(
            _Attribute(_CKA_CLASS, ctypes.addressof(class_value), ctypes.sizeof(class_value)),
            _Attribute(_CKA_LABEL, ctypes.addressof(label_buffer), len(encoded)),
        )
        self._module.check("C_FindObjectsInit", session, template, 2)
        found = (_CK_ULONG * limit)()
        count = _CK_ULONG(0)
        try:
            self._module.check("C_FindObjects", session, found, limit, ctypes.byref(count))
        finally:
            self._module.call("C_FindObjectsFinal", session)
        return [int(handle) for handle in found[: count.value]]

    def has_key(self, label: str) -> bool:
        try:
            self._with_reconnect(lambda: self._key(label))
        except KeyNotFound:
            return False
        return True

    def derive(self, key_label: str, info: bytes) -> Secret:
        """HKDF-Expand(PRK=master, info, L=32), i.e. HMAC-SHA256(master, info || 0x01)."""
        out = Secret(DERIVED_KEY_BYTES)
        try:
            self._own()
            self._with_reconnect(lambda: self._derive_once(key_label, info, out))
        except BaseException:
            out.wipe()
            raise
        return out

    def derive_ahead(self, key_label: str, info: bytes) -> int | None:
        """Queue `derive(key_label, info)` for the key thread; a ticket for
        `collect`, or None where nothing could be queued (the derivation is
        then left to `derive`)."""
        try:
            key = self._key(key_label)
        except (_TokenGone, HsmError, KeyNotFound) as e:
            log.debug("HSM: cannot derive ahead: %s", e)
            return None
        if self._ahead is None:
            self._ahead = _signer.Signer()
        try:
            ticket = self._ahead.submit(key, info + b"\x01")
        except BufferError:
            return None
        self._lend()
        return int(ticket)

    def collect(self, ticket: int, out: Secret) -> None:
        """Wait for a derivation queued by `derive_ahead` and put its key into
        `out` (DERIVED_KEY_BYTES). Raises HsmError where it failed."""
        assert self._ahead is not None
        self._lend()
        rv = self._ahead.collect(ticket, out.view)
        if rv == _CKR_OK:
            return
        if rv == _signer.CKR_FUNCTION_CANCELED:
            raise HsmError("the derivation ahead was cancelled")
        if rv == _signer.CKR_LENGTH_WRONG:
            raise HsmError(f"C_Sign returned other than {DERIVED_KEY_BYTES} bytes")
        raise HsmError(f"C_Sign failed (CKR 0x{rv:x})")

    def done(self, ticket: int) -> bool:
        """Whether `collect(ticket)` would return without waiting for the key thread."""
        return self._ahead is None or bool(self._ahead.done(ticket))

    def forget(self, ticket: int) -> None:
        """Drop a derivation queued by `derive_ahead`; its key is wiped."""
        if self._ahead is not None:
            self._ahead.cancel(ticket)

    def _with_reconnect(self, call: Callable[[], T]) -> T:
        try:
            if self._session is None:
                raise _TokenGone("not connected")
            return call()
        except _TokenGone as e:
            log.warning("HSM: %s", e)
        try:
            self.reconnect()
            return call()
        except _TokenGone as e:
            raise HsmError(f"token {self.token_label!r} unavailable: {e}") from e

    def arm(self, key_label: str) -> None:
        """Start the next derivation with this key ahead: its C_SignInit, by
        the key thread where there is one.

        Best effort: a failure leaves the session unarmed, and the next
        `derive` reconnects if the token has gone.
        """
        if self._session is None:
            return
        try:
            key = self._key(key_label)
            if self._ahead is None:
                self._sign_init(key)
                return
            self._ahead.arm(key)
            self._lend()
        except (_TokenGone, HsmError, KeyNotFound, BufferError) as e:
            log.debug("HSM: could not start a derivation ahead: %s", e)

    def _sign_init(self, key: int) -> None:
        """Have a sign operation with `key` active: the armed one, or a new one."""
        if self._armed == key:
            return
        self._disarm()
        mechanism = _Mechanism(_CKM_SHA256_HMAC, None, 0)
        self._module.check("C_SignInit", self._session, ctypes.byref(mechanism), key)
        self._armed = key

    def _disarm(self) -> None:
        """Finish an armed sign operation (there is no other way to end one)."""
        if self._armed is None:
            return
        self._armed = None
        with Secret(DERIVED_KEY_BYTES) as scratch:
            try:
                self._sign(b"", scratch)
            except (_TokenGone, HsmError) as e:
                log.debug("HSM: finishing the armed operation: %s", e)

    def _derive_once(self, key_label: str, info: bytes, out: Secret) -> None:
        self._sign_init(self._key(key_label))
        self._armed = None  # C_Sign ends the operation, whatever it returns
        self._sign(info + b"\x01", out)

    def _sign(self, message: bytes, out: Secret) -> None:
        length = _CK_ULONG(DERIVED_KEY_BYTES)
        target = (ctypes.c_char * DERIVED_KEY_BYTES).from_buffer(out.view)
        try:
            self._module.check(
                "C_Sign", self._session, message, len(message), ctypes.addressof(target), ctypes.byref(length)
            )
        finally:
            del target
        if length.value != DERIVED_KEY_BYTES:
            raise HsmError(f"C_Sign returned {length.value} bytes, expected {DERIVED_KEY_BYTES}")

    # -- data objects (the store's anchor) -------------------------------------

    def read_data(self, label: str) -> list[bytes]:
        """The values of the token's data objects (CKO_DATA) labelled `label`:
        none, one, or (after a crash inside `replace_data`) two."""
        self._own()
        return self._with_reconnect(lambda: self._with_rw_session(lambda s: self._read_data(s, label)))

    def replace_data(self, label: str, value: bytes) -> None:
        """Create a data object `label` (a private token object) holding
        `value`, then destroy the ones of that label that were there before.

        Not a change of the old object's value: SoftHSM2 refuses that
        (CKA_VALUE is read-only once set), and there is never a moment
        without an object.
        """
        self._own()
        self._with_reconnect(lambda: self._with_rw_session(lambda s: self._replace_data(s, label, value)))

    def _with_rw_session(self, call: Callable[[int], T]) -> T:
        """Run `call` on a read-write session of its own, closed after it. The
        login covers every session of the module instance, and the session that
        derives keys stays as it is (it may hold an armed sign operation)."""
        session = _CK_ULONG(0)
        slots = self._module.slots_with_label(self.token_label)
        if len(slots) != 1:
            raise _TokenGone(f"token {self.token_label!r} not found")
        self._module.check(
            "C_OpenSession", slots[0], _CKF_RW_SESSION | _CKF_SERIAL_SESSION, None, None, ctypes.byref(session)
        )
        try:
            return call(session.value)
        finally:
            self._module.call("C_CloseSession", session)

    def _read_data(self, session: int, label: str) -> list[bytes]:
        values = []
        for handle in self._find(session, _CKO_DATA, label, limit=_MAX_DATA_OBJECTS):
            template = (_Attribute * 1)(_Attribute(_CKA_VALUE, None, 0))
            self._module.check("C_GetAttributeValue", session, handle, template, 1)
            buffer = ctypes.create_string_buffer(max(template[0].value_len, 1))
            template[0].value = ctypes.addressof(buffer)
            self._module.check("C_GetAttributeValue", session, handle, template, 1)
            values.append(buffer.raw[: template[0].value_len])
        return values

    def _replace_data(self, session: int, label: str, value: bytes) -> None:
        old = self._find(session, _CKO_DATA, label, limit=_MAX_DATA_OBJECTS)
        encoded = label.encode()
        label_buffer = ctypes.create_string_buffer(encoded, len(encoded))
        value_buffer = ctypes.create_string_buffer(value, len(value))
        class_value = _CK_ULONG(_CKO_DATA)
        true = ctypes.c_ubyte(_CK_TRUE)
        template = (_Attribute * 5)(
            _Attribute(_CKA_CLASS, ctypes.addressof(class_value), ctypes.sizeof(class_value)),
            _Attribute(_CKA_TOKEN, ctypes.addressof(true), 1),
            _Attribute(_CKA_PRIVATE, ctypes.addressof(true), 1),
            _Attribute(_CKA_LABEL, ctypes.addressof(label_buffer), len(encoded)),
            _Attribute(_CKA_VALUE, ctypes.addressof(value_buffer), len(value)),
        )
        created = _CK_ULONG(0)
        self._module.check("C_CreateObject", session, template, 5, ctypes.byref(created))
        for handle in old:
            self._module.check("C_DestroyObject", session, handle)

    def close(self) -> None:
        self._own()
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
        self._disarm()
        session, self._session = self._session, None
        self._keys.clear()
        if session is not None:
            self._module.call("C_CloseSession", session)
        self._module.call("C_Finalize", None)


def _mapped(what: str, call: Callable[[], T]) -> T:
    """Run a python-pkcs11 call, turning its exceptions into envfs errors."""
    try:
        return call()
    except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange) as e:
        raise PinError(f"{what}: the PIN was not accepted by the token") from e
    except p11e.PinLocked as e:
        raise PinError(f"{what}: the token's PIN is locked") from e
    except p11e.NoSuchToken as e:
        raise TokenNotFound(f"{what}: no such token") from e
    except p11e.MultipleTokensReturned as e:
        raise TokenNotFound(f"{what}: several tokens carry this label") from e
    except p11e.NoSuchKey as e:
        raise KeyNotFound(f"{what}: no such key in the token") from e
    except p11e.PKCS11Error as e:
        raise HsmError(f"{what}: {type(e).__name__} {e}".rstrip()) from e


class HsmAdmin:
    """Key management on one token through python-pkcs11."""

    def __init__(self, module_path: str, token_label: str, pin: str) -> None:
        self.token_label = token_label
        self._lib = _mapped(f"loading PKCS#11 module {module_path}", lambda: pkcs11.lib(module_path))
        token = _mapped(f"token {token_label!r}", lambda: self._lib.get_token(token_label=token_label))
        try:
            self._session = _mapped(f"token {token_label!r}", lambda: token.open(rw=True, user_pin=pin))
        except HsmError as e:
            if not isinstance(e.__cause__, p11e.UserAlreadyLoggedIn):
                raise
            self._session = _mapped(f"token {token_label!r}", lambda: token.open(rw=True))

    def _key(self, label: str) -> Any:
        return _mapped(
            f"master key {label!r}",
            lambda: self._session.get_key(
                object_class=ObjectClass.SECRET_KEY, key_type=KeyType.GENERIC_SECRET, label=label
            ),
        )

    def has_key(self, label: str) -> bool:
        try:
            self._key(label)
        except KeyNotFound:
            return False
        return True

    def generate_master_key(self, label: str) -> None:
        """Create a 256-bit HMAC key inside the token, never extractable."""
        template = {
            Attribute.TOKEN: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True, Attribute.VERIFY: True, Attribute.PRIVATE: True,
        }  # fmt: skip
        _mapped(
            f"generating master key {label!r}",
            lambda: self._session.generate_key(
                KeyType.GENERIC_SECRET, MASTER_KEY_BYTES * 8, label=label, template=template,
                mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
            ),
        )  # fmt: skip

    def import_master_key(self, label: str, value: bytes) -> None:
        """Import a known master key (test vectors and migrations only)."""
        attrs = {
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.TOKEN: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True, Attribute.VERIFY: True, Attribute.PRIVATE: True,
            Attribute.LABEL: label, Attribute.VALUE: value,
        }  # fmt: skip
        _mapped(f"importing master key {label!r}", lambda: self._session.create_object(attrs))

    def key_origin(self, label: str) -> str:
        """'generated' when the key never left the token, else 'imported'."""
        key = self._key(label)
        never = _mapped("reading key attributes", lambda: key[Attribute.NEVER_EXTRACTABLE])
        return "generated" if never else "imported"

    def destroy_key(self, label: str) -> None:
        key = self._key(label)
        _mapped(f"destroying key {label!r}", key.destroy)

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except p11e.PKCS11Error as e:
                log.debug("closing HSM session: %s", e)
        try:
            self._lib.finalize()
        except p11e.PKCS11Error as e:
            log.debug("finalizing PKCS#11 module: %s", e)


def init_token(module_path: str, token_label: str, so_pin: str, user_pin: str) -> None:
    """Initialise a free slot's token and set its user PIN (embedded SoftHSM2).

    Done with raw calls because python-pkcs11 has no C_InitToken. Runs in a
    short-lived helper process (see `embedded`).
    """
    module = _Module(module_path)
    rv = module.call("C_Initialize", None)
    if rv not in (_CKR_OK, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
        raise HsmError(f"{module_path}: C_Initialize failed (CKR 0x{rv:x})")
    try:
        free = module.slots_with_label("")
        if not free:
            raise HsmError(f"{module_path}: no free slot for token {token_label!r}")
        so = so_pin.encode()
        module.check("C_InitToken", free[0], so, len(so), token_label.encode().ljust(32)[:32])
        # SoftHSM2 renumbers the slot once the token has a serial: look it up again.
        slots = module.slots_with_label(token_label)
        if len(slots) != 1:
            raise HsmError(f"{module_path}: token {token_label!r} not found after C_InitToken")
        session = _CK_ULONG(0)
        module.check(
            "C_OpenSession", slots[0], _CKF_RW_SESSION | _CKF_SERIAL_SESSION, None, None, ctypes.byref(session)
        )
        try:
            module.check("C_Login", session, _CKU_SO, so, len(so))
            user = user_pin.encode()
            module.check("C_InitPIN", session, user, len(user))
        finally:
            module.call("C_CloseSession", session)
    except _TokenGone as e:
        raise HsmError(f"{module_path}: {e}") from e
    finally:
        module.call("C_Finalize", None)
