"""The released DeepLab v2 models by name: download once, check the hash, convert once, cache the ``.keras``.

``from_preset(name)`` (also ``dk.DeepLabV2.from_preset``, ``deeplab-predict --preset`` and
``deeplab-eval --preset``) resolves ``name`` in :data:`~deeplab_keras.weights.presets.PRESETS`, downloads the
official file into ``<cache_dir>/models/deeplab_keras/`` (``cache_dir`` defaults to the Keras cache,
``$KERAS_HOME`` or ``~/.keras``), checks its sha256, takes the ``.caffemodel`` out of the archive when the
official file is a zip, converts it (a ``.caffemodel``, or a deeplab-pytorch ``.pth``) with
:func:`deeplab_keras.weights.caffe.convert_caffemodel` and keeps the result as ``<name>.keras``, next to
``<name>.keras.json`` (the settings and the source's sha256). Later calls load that ``.keras`` without touching
the network. The downloads are kept (several presets share one archive); delete the folder to reclaim the space.

Hashes. The authors published no checksums, and no stored source gives the sha256 of the official files, so
the registry records them as unknown (``sha256=None``) rather than inventing any. For such a preset the first
download is **pinned** (trust on first use) once it was read and converted successfully: its sha256 is printed
and written to ``pins.json`` in the cache folder, and every later download of that file (after the cache was
cleared, or on another preset sharing the archive) must match it. A first download that does not convert is
deleted, not pinned. Pass ``sha256=`` (``--preset-sha256``) to require a hash you obtained and trust. A download
that does not match the expected hash (the registry's, yours or the pinned one) is deleted and raises
:class:`PresetHashError`; nothing is cached from it. An unreadable or malformed ``pins.json`` stops every call
(:class:`PresetCacheError`); it is never rewritten from scratch.

Failing closed. Every connection and every read waits at most ``timeout`` seconds (default
:data:`DOWNLOAD_TIMEOUT_S`, or ``$DEEPLAB_DOWNLOAD_TIMEOUT``); a download over :data:`MAX_DOWNLOAD_BYTES`, or
shorter than its ``Content-Length``, is an error. A zip member is found by its name, its size is checked in the
zip directory against :data:`MAX_MEMBER_BYTES` and again while it is streamed to a file name of ours. Another
process converting into the same cache holds its lock: the wait is announced on stderr and bounded
(:data:`LOCK_TIMEOUT_S`, or ``$DEEPLAB_PRESET_LOCK_TIMEOUT``). A complete cache is read without the lock, so it
may be read-only. The downloaded files are only parsed as data (our own protobuf reader, a restricted unpickler
for ``.pth``), never executed.

Example:
    >>> import deeplab_keras as dk
    >>> model = dk.DeepLabV2.from_preset("deeplabv2_resnet101_msc_voc")   # doctest: +SKIP
"""
import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import sys
import zipfile

from deeplab_keras.files import TEMP_PREFIX, atomic_write_json, remove_temp_files
from deeplab_keras.locks import LockedError, exclusive_lock
from deeplab_keras.weights.caffe import convert_caffemodel
from deeplab_keras.weights.checkpoints import load_model
from deeplab_keras.weights.presets import _SHA256, PresetError, _check_sha256, get_preset

__all__ = ["PresetFetchError", "PresetHashError", "PresetCacheError", "preset_path", "from_preset", "load_cached",
           "cache_folder"]

CACHE_SUBDIR = os.path.join("models", "deeplab_keras")
PINS_FILE = "pins.json"
DOWNLOAD_TIMEOUT_S = 60.0  # seconds to connect, and for each read; $DEEPLAB_DOWNLOAD_TIMEOUT or timeout=
TIMEOUT_ENV = "DEEPLAB_DOWNLOAD_TIMEOUT"
LOCK_TIMEOUT_S = 1800.0  # another process downloading/converting: wait for it this long (announced on stderr)
LOCK_TIMEOUT_ENV = "DEEPLAB_PRESET_LOCK_TIMEOUT"
MAX_DOWNLOAD_BYTES = 4 << 30  # the released files are 0.2-1.3 GB
MAX_MEMBER_BYTES = 1 << 30    # a .caffemodel taken out of a zip (the released ones: about 170 MB)
MAX_PINS_BYTES = 1 << 20

class PresetFetchError(RuntimeError):
    """A runtime failure: the download failed, or the archive lacks the expected member."""


class PresetHashError(PresetFetchError):
    """The downloaded file's sha256 differs from the expected one; the file was deleted, nothing was cached."""


class PresetCacheError(PresetFetchError):
    """The cache holds a file that cannot be used (a malformed ``pins.json``, a ``.keras`` that does not load);
    the message names it and what to do."""


def cache_folder(cache_dir=None):
    """The folder that holds the downloads, ``pins.json`` and the converted ``.keras`` files."""
    if cache_dir is None:  # Keras' cache: $KERAS_HOME (read at call time) or ~/.keras
        cache_dir = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(os.path.expanduser(os.fspath(cache_dir)), CACHE_SUBDIR)


def preset_path(name, cache_dir=None, *, sha256=None, timeout=None, progress=True):
    """Path of the converted ``.keras`` of preset ``name``: downloaded, checked and converted on first use.

    Args:
        name: a key of :data:`PRESETS` (or a :class:`Preset`).
        cache_dir: cache root (default: the Keras cache, ``$KERAS_HOME`` or ``~/.keras``).
        sha256: the sha256 you trust for the downloaded file; overrides the registry's and the pinned one.
        timeout: seconds to wait for the connection and for each read of the download (default
            ``$DEEPLAB_DOWNLOAD_TIMEOUT`` or :data:`DOWNLOAD_TIMEOUT_S`).
        progress: show the download bar and the "downloading" / "converting" lines on stderr (warnings, such as
            a new pin or a wait for another process, always print).

    Raises:
        PresetError: (ValueError) unknown name, malformed ``sha256`` or ``timeout``, cache folder not writable.
        PresetFetchError: (RuntimeError) failed or timed-out download, archive without the member, a member over
            :data:`MAX_MEMBER_BYTES`; :class:`PresetHashError` when the download does not match the expected
            sha256 (it was deleted); :class:`PresetCacheError` for an unreadable or malformed ``pins.json``.
        deeplab_keras.locks.LockedError: another process held the cache longer than the lock time-out.
        deeplab_keras.weights.caffe.CaffeModelError: the file does not convert.

    Example:
        >>> path = preset_path("deeplabv2_resnet101_msc_voc")     # doctest: +SKIP
    """
    preset = get_preset(name)
    if sha256 is not None:
        sha256 = _check_sha256(sha256, "sha256")
    timeout = _seconds(timeout, TIMEOUT_ENV, DOWNLOAD_TIMEOUT_S, "timeout")
    folder = cache_folder(cache_dir)
    pins_path, target = os.path.join(folder, PINS_FILE), os.path.join(folder, f"{preset.name}.keras")
    if _is_cached(preset, target, sha256 or preset.sha256 or _pinned(_read_pins(pins_path), preset)):
        return target  # a complete cache is read without the lock (files are replaced atomically): may be read-only
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise PresetError(f"cannot create the preset cache {folder} ({err.strerror}); pass cache_dir= "
                          "or set KERAS_HOME to a writable folder") from None
    with _cache_lock(folder):
        remove_temp_files(folder, (".partial-", TEMP_PREFIX))  # of a killed download (we hold the lock)
        pins = _read_pins(pins_path)
        expected = sha256 or preset.sha256 or _pinned(pins, preset)
        if _is_cached(preset, target, expected):
            return target  # converted by the process we waited for
        download, actual = _download(preset, folder, expected, sha256, timeout, progress)
        try:
            _convert(preset, download, target, progress)
        except Exception:
            if expected is None:  # a first download that does not convert (truncated, tampered) is never pinned
                _remove(download)
                _say(f"preset {preset.name}: {download} did not convert; it was deleted and not pinned")
            raise
        if expected is None:
            pins[preset.filename] = {"sha256": actual, "url": preset.url,
                                     "pinned": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                         timespec="seconds")}
            atomic_write_json(pins_path, pins)
            _say(f"{preset.filename}: no published sha256; pinned {actual} in {pins_path} "
                 "(later downloads of this file must match it; compare it with a hash you trust)")
        atomic_write_json(target + ".json", {"preset": preset.name, "source_sha256": actual,
                                             "conversion": preset.conversion()})
        return target


def from_preset(name, cache_dir=None, *, sha256=None, timeout=None, progress=True):
    """The released model ``name`` as a :class:`deeplab_keras.DeepLabV2` (see :func:`preset_path`).

    Example:
        >>> model = from_preset("deeplabv2_resnet101_msc_voc")     # doctest: +SKIP
    """
    return load_cached(preset_path(name, cache_dir, sha256=sha256, timeout=timeout, progress=progress))


def load_cached(path):
    """Loads a converted preset ``.keras`` from the cache; a file that does not load names itself for deletion.

    Raises:
        PresetCacheError: the cached file is corrupt (e.g. cut short by a full disk outside this package).

    Example:
        >>> model = load_cached(preset_path("deeplabv2_resnet101_msc_voc"))     # doctest: +SKIP
    """
    try:
        return load_model(path)
    except Exception as err:  # noqa: BLE001  (Keras raises many kinds for a damaged archive)
        text = " ".join(str(err.__cause__ or err).split())[:200]
        raise PresetCacheError(f"the cached preset model {path} does not load ({text}); delete it (and "
                               f"{os.path.basename(path)}.json) to convert the preset again") from err


def _seconds(value, env, default, what):
    """A positive finite number of seconds: ``value``, else ``$env``, else ``default``."""
    if value is None:
        value, what = os.environ.get(env) or default, f"${env}"
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise PresetError(f"{what}={str(value)[:40]!r}: give a positive number of seconds")
    return seconds


def _say(message):
    print(f"deeplab_keras presets: {message}", file=sys.stderr, flush=True)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_pins(path):
    """{download file name: {"sha256": ...}} of ``pins.json`` ({} when missing); anything else stops the call."""
    def bad(what):
        return PresetCacheError(f"the pins file {path} {what}; it holds the hashes pinned on first download: repair "
                                "or restore it (deleting it forgets every pin)")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PINS_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise bad(f"cannot be read ({err.strerror})") from None
    if len(data) > MAX_PINS_BYTES:
        raise bad(f"is over {MAX_PINS_BYTES} bytes")
    try:
        pins = json.loads(data.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"is not valid JSON ({' '.join(str(err).split())[:80]})") from None
    if not isinstance(pins, dict):
        raise bad("is not a JSON object")
    for key, pin in pins.items():
        if not (isinstance(pin, dict) and isinstance(pin.get("sha256"), str) and _SHA256.match(pin["sha256"])):
            raise bad(f"has a malformed entry {key[:60]!r} (expected {{\"sha256\": 64 hex digits, ...}})")
    return pins


def _pinned(pins, preset):
    return (pins.get(preset.filename) or {}).get("sha256")


def _is_cached(preset, target, expected):
    """Whether ``target`` is the complete conversion of this preset (from the expected download, if known)."""
    meta = _read_json(target + ".json")
    return (os.path.isfile(target) and isinstance(meta, dict) and meta.get("conversion") == preset.conversion()
            and (expected is None or meta.get("source_sha256") == expected))


@contextlib.contextmanager
def _cache_lock(folder):
    """The cache folder's lock; a wait for another process is announced on stderr and bounded."""
    path, what = os.path.join(folder, ".presets.lock"), f"the preset cache {folder}"
    with contextlib.ExitStack() as stack:
        try:
            try:
                stack.enter_context(exclusive_lock(path, what=what))
            except LockedError as err:
                wait = _seconds(None, LOCK_TIMEOUT_ENV, LOCK_TIMEOUT_S, "lock timeout")
                _say(f"waiting up to {wait:g} s for process {err.pid} to finish with {what} (lock file {path}; "
                     f"${LOCK_TIMEOUT_ENV} sets the wait)")
                try:
                    stack.enter_context(exclusive_lock(path, what=what, timeout=wait))
                except LockedError as again:
                    raise LockedError(f"{again}; gave up after {wait:g} s (${LOCK_TIMEOUT_ENV} sets the wait)",
                                      again.path, again.pid) from None
        except OSError as err:  # an incomplete cache in a read-only folder or file system
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise PresetError(f"cannot write the preset cache {folder} ({err.strerror}); pass cache_dir= or set "
                              "KERAS_HOME to a writable folder") from None
        yield


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(preset, folder, expected, user_sha256, timeout, progress):
    """The verified download in ``folder`` (fetched unless a copy with the expected hash is there) and its sha256."""
    final = os.path.join(folder, preset.filename)
    if os.path.isfile(final):
        actual = _sha256_file(final)
        if expected is None or actual == expected:
            return final, actual
        _say(f"{final}: sha256 {actual} is not the expected {expected}; downloading it again")
        os.remove(final)
    partial = os.path.join(folder, f".partial-{os.getpid()}-{preset.filename}")
    if progress:
        _say(f"preset {preset.name}: downloading {preset.url}")
    try:
        actual = _fetch(preset, partial, timeout, progress)
    except KeyboardInterrupt:
        _remove(partial)
        raise KeyboardInterrupt(f"interrupted while downloading preset {preset.name}; the partial download was "
                                "deleted and nothing was cached (run the command again to download it)") from None
    except BaseException:
        _remove(partial)
        raise
    if expected is not None and actual != expected:
        _remove(partial)
        source = ("--preset-sha256 / sha256=" if user_sha256 else
                  "the registry" if preset.sha256 else f"the hash pinned in {os.path.join(folder, PINS_FILE)}")
        raise PresetHashError(f"preset {preset.name}: {preset.url} has sha256 {actual}, expected {expected} (from "
                              f"{source}); the download was deleted and nothing was cached")
    os.replace(partial, final)
    return final, actual


def _fetch(preset, dest, timeout, progress):
    """Streams ``preset.url`` into ``dest`` (connect and each read bounded by ``timeout``); returns its sha256."""
    import http.client
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    digest, size, total = hashlib.sha256(), 0, None

    def failed(why):
        return PresetFetchError(f"preset {preset.name}: download of {preset.url} failed ({why}); check the network, "
                                "or download the file yourself and convert it with deeplab-convert")
    try:
        request = urllib.request.Request(preset.url, headers={"User-Agent": "deeplab_keras"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.strip().isdigit() else None
            if total is not None and total > MAX_DOWNLOAD_BYTES:
                raise failed(f"it announces {total} bytes, over the cap of {MAX_DOWNLOAD_BYTES}")
            with tqdm(total=total, unit="B", unit_scale=True, desc=preset.filename, file=sys.stderr,
                      disable=not progress, leave=False) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    size += len(block)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise failed(f"over the cap of {MAX_DOWNLOAD_BYTES} bytes")
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
    except PresetFetchError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            raise failed(f"no answer within {timeout:g} s; ${TIMEOUT_ENV} or timeout= sets the wait") from None
        text = str(err) if isinstance(err, urllib.error.HTTPError) else str(reason)  # "HTTP Error 404: Not Found"
        raise failed(" ".join(text.split())[:200] or type(reason).__name__) from None
    if total is not None and size != total:
        raise failed(f"received {size} of the {total} bytes announced")
    return digest.hexdigest()


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _convert(preset, download, target, progress):
    """Converts ``download`` (or its zip member) into ``target`` atomically; the extracted member is removed."""
    source, extracted = download, None
    if preset.member is not None:
        extracted = os.path.join(os.path.dirname(target), f".partial-{os.getpid()}-{preset.name}.caffemodel")
        _extract_member(download, preset, extracted)
        source = extracted
    if progress:
        _say(f"preset {preset.name}: converting {os.path.basename(download)}"
             + (f" ({preset.member})" if preset.member else "") + f" -> {target}")
    try:  # convert_caffemodel writes the .keras atomically
        convert_caffemodel(source, target, backbone=preset.backbone, num_classes=preset.num_classes,
                           msc_scales=preset.msc_scales, backbone_only=preset.backbone_only, overwrite=True,
                           **preset.model_kwargs)
    finally:
        if extracted is not None:
            _remove(extracted)


def _extract_member(archive, preset, out):
    """Streams the member of ``archive`` whose base name is ``preset.member`` into ``out``, at most
    :data:`MAX_MEMBER_BYTES` (checked in the zip directory first, then while streaming)."""
    try:
        with zipfile.ZipFile(archive) as z:
            infos = [i for i in z.infolist() if not i.is_dir() and os.path.basename(i.filename) == preset.member]
            if len(infos) != 1:
                found = sorted(i.filename for i in z.infolist() if i.filename.endswith(".caffemodel"))
                raise PresetFetchError(f"preset {preset.name}: {archive} holds {len(infos) or 'no'} member(s) named "
                                       f"{preset.member!r}; its .caffemodel members: {found or 'none'}")
            info = infos[0]
            limit = min(info.file_size, MAX_MEMBER_BYTES)
            if info.file_size > MAX_MEMBER_BYTES:
                raise PresetFetchError(f"preset {preset.name}: member {info.filename} of {archive} declares "
                                       f"{info.file_size} bytes, over the cap of {MAX_MEMBER_BYTES}; not extracted")
            written = 0
            with z.open(info) as src, open(out, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    written += len(block)
                    if written > limit:
                        raise PresetFetchError(f"preset {preset.name}: member {info.filename} of {archive} inflates "
                                               f"past the {limit} bytes its zip directory declares; not extracted")
                    dst.write(block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        _remove(out)
        raise PresetFetchError(f"preset {preset.name}: {archive} is not a readable zip archive ({err}); delete it and "
                               "try again") from None
    except BaseException:
        _remove(out)
        raise
