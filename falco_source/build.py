"""Build ``libgitlabkafka.so``: cffi's embedding mode around ``plugin_shim.c``.

The library bakes in, at build time:
  - the metadata answers (fields JSON from the shared catalogue, init schema, open params, name, ID);
  - the path of the libpython it links (re-opened RTLD_GLOBAL by its constructor, found via RPATH);
  - the virtual environment to run (default: the one running the build), overridable at run time with
    FALCO_GITLAB_VENV, plus FALCO_GITLAB_PYTHONPATH for extra import paths;
  - the project root, used only when ``falco_source`` is not installed in that environment.
It is linked with ``-z nodelete``: an embedded CPython cannot be unloaded, so a dlclose() keeps the
code mapped and a later dlopen() (Falco reloading its plugins) finds the running interpreter again.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from falco_source import CFFI_MODULE_NAME, DEFAULT_PLUGIN_ID, EVENT_SOURCE, LIBRARY_NAME, PLUGIN_NAME
from falco_source import REQUIRED_API_VERSION as REQUIRED_API

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
DEFAULT_OUTPUT = Path("build") / "plugin" / LIBRARY_NAME  # relative to the working directory


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class BuildResult:
    path: Path
    plugin_id: int
    venv: str
    libpython: str


def c_string(text: str) -> str:
    """A C string literal (ASCII only, split in lines) for ``text``."""
    out: list[str] = []
    chunk: list[str] = []
    for char in text:
        code = ord(char)
        if char in ('"', "\\"):
            chunk.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            chunk.append(char)
        elif code < 0x80:
            chunk.append(f"\\{code:03o}")
        else:
            chunk.extend(f"\\{byte:03o}" for byte in char.encode("utf-8"))
        if len(chunk) >= 100:
            out.append('"' + "".join(chunk) + '"')
            chunk = []
    if chunk or not out:
        out.append('"' + "".join(chunk) + '"')
    return " \\\n    ".join(out)


def default_venv() -> str:
    """The virtual environment running this build, or '' when it is not one."""
    return sys.prefix if sys.prefix != sys.base_prefix else ""


def libpython_paths() -> tuple[str, str, str]:
    """(full path, soname, directory) of the shared libpython of this interpreter."""
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY") or ""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise BuildError(
            f"this Python ({sys.executable}) is not built with --enable-shared: the plugin needs "
            "a shared libpython to embed"
        )
    path = os.path.join(libdir, soname)
    if not os.path.exists(path):
        raise BuildError(f"shared libpython {path} not found")
    return path, soname, libdir


def _cdef(nfields: int) -> str:
    return """
typedef struct ss_plugin_event ss_plugin_event;
typedef struct {
    int64_t id;
    void *py;
    ...;
} gk_state;
typedef struct {
    void *py;
    char *batch_base;
    uint32_t *offs;
    ss_plugin_event **evts;
    uint32_t capacity;
    ...;
} gk_instance;

extern "Python" int gkpy_init(gk_state *, const char *);
extern "Python" void gkpy_destroy(gk_state *);
extern "Python" int gkpy_open(gk_state *, gk_instance *, const char *);
extern "Python" void gkpy_close(gk_state *, gk_instance *);
extern "Python" int gkpy_next_batch(gk_state *, gk_instance *, uint32_t *);
extern "Python" int gkpy_get_progress(gk_state *, gk_instance *, uint32_t *, const char **);
extern "Python" int gkpy_decode(gk_state *, uint64_t, const uint8_t *, uint64_t, uint32_t, int64_t);
extern "Python" int gkpy_extract_arg(gk_state *, uint64_t, const uint8_t *, uint64_t, uint32_t, int64_t,
                                     uint32_t, const char *, const char **);
extern "Python" int gkpy_event_to_string(gk_state *, uint64_t, const uint8_t *, uint64_t, uint32_t,
                                         const char **);
extern "Python" int gkpy_get_metrics(gk_state *, uint64_t *, uint32_t);

void gk_load_cache(gk_state *, const char *, uint32_t, const char *, uint32_t, const char *, const char *,
                   uint32_t);
void gk_log(gk_state *, int, const char *);
void gk_set_error(gk_state *, const char *);
uint32_t plugin_get_id(void);
const char *gk_fields_digest(void);
"""


_INIT_CODE = """
import sys
from {module} import ffi, lib
try:
    import falco_source.plugin
except ImportError:
    sys.path.insert(0, {root!r})
    import falco_source.plugin
falco_source.plugin.attach(ffi, lib)
"""


def prelude(*, plugin_id: int, venv: str, libpython: str, soname: str) -> str:
    from falco_source import meta

    table = meta.field_table()
    kinds = {True: "SS_PLUGIN_METRIC_TYPE_MONOTONIC", False: "SS_PLUGIN_METRIC_TYPE_NON_MONOTONIC"}
    metric_defs = ", ".join(f"{{{c_string(name)}, {kinds[mono]}}}" for name, mono in meta.METRICS)
    defines = {
        "GK_PLUGIN_NAME": c_string(PLUGIN_NAME),
        "GK_PLUGIN_ID": f"{plugin_id}u",
        "GK_PLUGIN_VERSION": c_string(meta.plugin_version()),
        "GK_REQUIRED_API_VERSION": c_string(REQUIRED_API),
        "GK_PLUGIN_DESCRIPTION": c_string(meta.DESCRIPTION),
        "GK_PLUGIN_CONTACT": c_string(meta.CONTACT),
        "GK_EVENT_SOURCE": c_string(EVENT_SOURCE),
        "GK_EXTRACT_EVENT_SOURCES": c_string(meta.extract_event_sources_json()),
        "GK_FIELDS_JSON": c_string(meta.fields_json()),
        "GK_FIELDS_DIGEST": c_string(meta.fields_digest()),
        "GK_INIT_SCHEMA": c_string(meta.init_schema_json()),
        "GK_OPEN_PARAMS": c_string(meta.open_params_json()),
        "GK_NFIELDS": str(len(table)),
        "GK_FIELD_TYPES": "{" + ", ".join(str(code) for code, _ in table) + "}",
        "GK_FIELD_HAS_ARG": "{" + ", ".join("1" if arg else "0" for _, arg in table) + "}",
        "GK_NMETRICS": str(len(meta.METRICS)),
        "GK_METRIC_DEFS": "{" + metric_defs + "}",
        "GK_LIBPYTHON": c_string(libpython),
        "GK_LIBPYTHON_SONAME": c_string(soname),
        "GK_VENV": c_string(venv),
        "GK_PROJECT_ROOT": c_string(str(PROJECT_ROOT)),
    }
    lines = ["/* generated by falco_source/build.py */"]
    lines += [f"#define {name} {value}" for name, value in defines.items()]
    return "\n".join(lines) + "\n"


def build_plugin(
    output: str | os.PathLike[str] | None = None,
    *,
    plugin_id: int = DEFAULT_PLUGIN_ID,
    venv: str | None = None,
    tmpdir: str | os.PathLike[str] | None = None,
    verbose: bool = False,
) -> BuildResult:
    """Compile the plugin library to ``output`` (default ./build/plugin/libgitlabkafka.so)."""
    import cffi

    from falco_source import meta

    if not 1 <= plugin_id <= 0xFFFF_FFFF:
        raise BuildError(f"plugin id {plugin_id} is not a positive 32-bit number")
    target = Path(output) if output is not None else DEFAULT_OUTPUT
    venv_dir = default_venv() if venv is None else (str(Path(venv).resolve()) if venv else "")
    if venv_dir and not (Path(venv_dir) / "pyvenv.cfg").exists():
        raise BuildError(f"{venv_dir} is not a virtual environment (no pyvenv.cfg)")
    libpython, soname, libdir = libpython_paths()

    ffi = cffi.FFI()
    ffi.embedding_api("")
    ffi.cdef(_cdef(len(meta.field_table())))
    source = prelude(plugin_id=plugin_id, venv=venv_dir, libpython=libpython, soname=soname)
    source += (PACKAGE_DIR / "plugin_shim.c").read_text(encoding="utf-8")
    ffi.set_source(
        CFFI_MODULE_NAME,
        source,
        include_dirs=[str(PACKAGE_DIR)],
        libraries=["dl", "pthread"],
        extra_compile_args=["-O2", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"],
        extra_link_args=["-Wl,-z,nodelete", "-Wl,-z,now", "-Wl,--no-undefined", f"-Wl,-rpath,{libdir}"],
    )
    ffi.embedding_init_code(_INIT_CODE.format(module=CFFI_MODULE_NAME, root=str(PROJECT_ROOT)))

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gitlabkafka-build-", dir=tmpdir) as work:
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured if not verbose else sys.stdout):
                built = ffi.compile(tmpdir=work, target=LIBRARY_NAME, verbose=verbose)
        except Exception as exc:  # cffi raises distutils/setuptools errors of several kinds
            raise BuildError(f"compiling the plugin failed: {exc}\n{captured.getvalue()}") from exc
        staged = target.with_name(target.name + ".tmp")
        shutil.copyfile(built, staged)
        os.chmod(staged, 0o755)  # noqa: S103 - a shared library others load
        # A fresh inode: a library mapped by a running process is never rewritten in place.
        os.replace(staged, target)
    return BuildResult(path=target, plugin_id=plugin_id, venv=venv_dir, libpython=libpython)
