/*
 * gitlabkafka Falco plugin: the static C part of the shared library.
 *
 * falco_source/build.py compiles this file through cffi's embedding mode, after a prelude of
 * generated #defines (GK_*: name, ID, version, the fields JSON, the init schema, the field type table,
 * the libpython path and the virtual environment baked at build time).
 *
 * What lives here, and why:
 *   - the metadata functions, answered from static data: Falco calls them before init (and a NULL
 *     from get_required_api_version crashes it), and `falco --list` should not need Python;
 *   - a constructor that re-opens libpython with RTLD_GLOBAL: Falco dlopen()s plugins RTLD_LOCAL, so
 *     without it Python's C extension modules (cffi's backend, msgspec, confluent-kafka) cannot
 *     resolve the interpreter's symbols;
 *   - the embedded interpreter's start-up, configured as the project's virtual environment;
 *   - thin wrappers that marshal each API call into the Python implementation (falco_source.plugin),
 *     plus a per-handle cache that serves field values of the current event without re-entering
 *     Python for every field.
 * Any failure becomes an SS_PLUGIN_FAILURE with a message for get_last_error(), never a crash.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "plugin_api_subset.h"

#define GK_EXPORT __attribute__((visibility("default")))
#define GK_ERRLEN 1024
#define GK_MAGIC 0x676b6b66u /* "gkkf" */

/* Python-implemented functions return GK_PY_BASE + rc; cffi returns 0 when Python could not run. */
#define GK_PY_BASE 1000
#define GK_PY_RAN(r) ((r) >= GK_PY_BASE - 16 && (r) <= GK_PY_BASE + 16)

static const uint32_t gk_field_types[GK_NFIELDS] = GK_FIELD_TYPES;
static const uint8_t gk_field_has_arg[GK_NFIELDS] = GK_FIELD_HAS_ARG;

typedef struct gk_state {
	uint32_t magic;
	int64_t id;              /* registry id of the Python object, 0 before init succeeded */
	void* py;                /* cffi handle of the Python object */
	ss_plugin_owner_t* owner;
	ss_plugin_log_fn_t log_fn;
	pthread_mutex_t lock;    /* serialises extraction on this handle */
	struct gk_instance* current; /* the open capture, whose batch extraction can look events up in */
	char lasterr[GK_ERRLEN];
	/* values of the event last decoded for extraction, filled by Python */
	int cache_valid;
	uint64_t cache_evtnum;
	const uint8_t* cache_data;
	uint32_t cache_len;
	const char* cache_blob;  /* NUL-separated strings, owned by Python */
	int64_t cache_off[GK_NFIELDS]; /* -1: absent; strings: offset in cache_blob */
	uint64_t cache_num[GK_NFIELDS];
	/* extraction results, valid until the next extract_fields call */
	uint32_t res_cap;
	const char** res_str;
	uint64_t* res_u64;
	ss_plugin_bool* res_bool;
	/* metrics */
	uint64_t metric_values[GK_NMETRICS];
	ss_plugin_metric metrics[GK_NMETRICS];
} gk_state;

typedef struct gk_instance {
	uint32_t magic;
	struct gk_state* state;
	void* py;                   /* cffi handle of the Python source object */
	char* batch_base;           /* events of the current batch, owned by Python */
	uint32_t* offs;             /* offset of each event in batch_base, owned by Python */
	ss_plugin_event** evts;     /* pointer array handed to the framework, owned by Python */
	uint32_t capacity;
	uint32_t count;             /* events in the current batch */
	const char* batch_end;      /* end of the current batch's last event */
} gk_instance;

/* ---- the Python side (cffi extern "Python", generated after this code) ------------------------ */

static int gkpy_init(gk_state* s, const char* config);
static void gkpy_destroy(gk_state* s);
static int gkpy_open(gk_state* s, gk_instance* h, const char* params);
static void gkpy_close(gk_state* s, gk_instance* h);
static int gkpy_next_batch(gk_state* s, gk_instance* h, uint32_t* count);
static int gkpy_get_progress(gk_state* s, gk_instance* h, uint32_t* pct, const char** text);
static int gkpy_decode(gk_state* s,
                       uint64_t evtnum,
                       const uint8_t* data,
                       uint64_t address,
                       uint32_t len,
                       int64_t index);
static int gkpy_extract_arg(gk_state* s,
                            uint64_t evtnum,
                            const uint8_t* data,
                            uint64_t address,
                            uint32_t len,
                            int64_t index,
                            uint32_t field_id,
                            const char* arg,
                            const char** out);
static int gkpy_event_to_string(gk_state* s,
                                uint64_t evtnum,
                                const uint8_t* data,
                                uint64_t address,
                                uint32_t len,
                                const char** out);
static int gkpy_get_metrics(gk_state* s, uint64_t* values, uint32_t count);

/* ---- helpers callable from Python --------------------------------------------------------------- */

static void gk_set_error(gk_state* s, const char* msg) {
	if(s == NULL) {
		return;
	}
	snprintf(s->lasterr, sizeof(s->lasterr), "%s", msg ? msg : "");
}

/* Fill the extraction cache from the flat table of falco_source.extract.Extractor.table(): every
 * field absent, then `nstr` NUL-terminated strings from `blob` for the field ids in `str_slots`, then
 * `nnum` uint64 values (little endian, 8 bytes each in `nums`) for the field ids in `num_slots`. */
static void gk_load_cache(gk_state* s,
                          const char* blob,
                          uint32_t blob_len,
                          const char* str_slots,
                          uint32_t nstr,
                          const char* num_slots,
                          const char* nums,
                          uint32_t nnum) {
	for(uint32_t i = 0; i < GK_NFIELDS; i++) {
		s->cache_off[i] = -1;
	}
	s->cache_blob = blob;
	uint32_t pos = 0;
	for(uint32_t i = 0; i < nstr && pos < blob_len; i++) {
		uint8_t slot = (uint8_t)str_slots[i];
		const char* nul = memchr(blob + pos, '\0', blob_len - pos);
		if(nul == NULL) {
			break; /* never leave a string without its terminator */
		}
		if(slot < GK_NFIELDS && gk_field_types[slot] == FTYPE_STRING) {
			s->cache_off[slot] = pos;
		}
		pos = (uint32_t)(nul - blob) + 1;
	}
	for(uint32_t i = 0; i < nnum; i++) {
		uint8_t slot = (uint8_t)num_slots[i];
		if(slot < GK_NFIELDS && gk_field_types[slot] != FTYPE_STRING) {
			memcpy(&s->cache_num[slot], nums + 8 * (size_t)i, 8);
			s->cache_off[slot] = 0;
		}
	}
}

static void gk_log(gk_state* s, int sev, const char* msg) {
	if(s != NULL && s->log_fn != NULL) {
		s->log_fn(s->owner, NULL, msg, (ss_plugin_log_severity)sev);
	} else if(sev <= SS_PLUGIN_LOG_SEV_WARNING) {
		fprintf(stderr, "%s: %s\n", GK_PLUGIN_NAME, msg);
	}
}

/* ---- libpython visibility ----------------------------------------------------------------------- */

__attribute__((constructor)) static void gk_promote_libpython(void) {
	/* libpython is our DT_NEEDED dependency, loaded RTLD_LOCAL with us. Re-open it RTLD_GLOBAL so
	 * that the Python extension modules imported later can bind to the interpreter's symbols. */
	const char* candidates[] = {GK_LIBPYTHON, GK_LIBPYTHON_SONAME};
	for(size_t i = 0; i < sizeof(candidates) / sizeof(candidates[0]); i++) {
		if(candidates[i][0] == '\0') {
			continue;
		}
		if(dlopen(candidates[i], RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD) != NULL) {
			return;
		}
	}
	for(size_t i = 0; i < sizeof(candidates) / sizeof(candidates[0]); i++) {
		if(candidates[i][0] != '\0' && dlopen(candidates[i], RTLD_NOW | RTLD_GLOBAL) != NULL) {
			return;
		}
	}
	/* Nothing else to do here: the interpreter start-up reports the problem through init(). */
}

/* ---- embedded interpreter start-up -------------------------------------------------------------- */

static pthread_once_t gk_py_once = PTHREAD_ONCE_INIT;
static int gk_py_ok = 0;
static char gk_py_err[GK_ERRLEN] = "the embedded Python interpreter was not started";

static const char* gk_env_or(const char* name, const char* fallback) {
	const char* v = getenv(name);
	return (v != NULL) ? v : fallback;
}

/* Python run once, before cffi's own start-up imports _cffi_backend: put the configured paths in
 * front of sys.path and import the implementation, reporting any failure as text. */
static const char gk_bootstrap_code[] =
        "import os, sys\n"
        "error = None\n"
        "try:\n"
        "    import site\n"
        "    def _front(path):\n"
        "        before = list(sys.path)\n"
        "        site.addsitedir(path)\n"
        "        added = [p for p in sys.path if p not in before]\n"
        "        sys.path[:] = added + [p for p in before if p not in added]\n"
        "    if venv and sys.prefix != os.path.realpath(venv) and sys.prefix != venv:\n"
        "        if not os.path.isdir(venv):\n"
        "            raise RuntimeError(f'virtual environment {venv} does not exist '\n"
        "                               '(set FALCO_GITLAB_VENV, or rebuild the plugin)')\n"
        "        ver = f'python{sys.version_info[0]}.{sys.version_info[1]}'\n"
        "        for lib in ('lib', 'lib64'):\n"
        "            sp = os.path.join(venv, lib, ver, 'site-packages')\n"
        "            if os.path.isdir(sp):\n"
        "                _front(sp)\n"
        "    for p in reversed([p for p in extra_path.split(os.pathsep) if p]):\n"
        "        _front(p)\n"
        "    try:\n"
        "        import falco_source\n"
        "    except ImportError:\n"
        "        if project_root and project_root not in sys.path:\n"
        "            sys.path.insert(0, project_root)\n"
        "    import _cffi_backend\n"
        "    import falco_source.plugin\n"
        "except BaseException as exc:\n"
        "    import traceback\n"
        "    traceback.print_exception(exc, file=sys.stderr)\n"
        "    error = f'{type(exc).__name__}: {exc} (python {sys.version.split()[0]}, '\\\n"
        "            f'prefix {sys.prefix}, venv {venv or \"-\"}, sys.path {sys.path})'\n";

static void gk_python_bootstrap(void) {
	PyObject* globals = PyDict_New();
	if(globals == NULL) {
		snprintf(gk_py_err, sizeof(gk_py_err), "embedded Python: out of memory");
		PyErr_Clear();
		return;
	}
	PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins());
	const char* venv = gk_env_or("FALCO_GITLAB_VENV", GK_VENV);
	if(strcmp(venv, "none") == 0) {
		venv = "";
	}
	PyObject* v;
	v = PyUnicode_DecodeFSDefault(venv);
	PyDict_SetItemString(globals, "venv", v);
	Py_XDECREF(v);
	v = PyUnicode_DecodeFSDefault(gk_env_or("FALCO_GITLAB_PYTHONPATH", ""));
	PyDict_SetItemString(globals, "extra_path", v);
	Py_XDECREF(v);
	v = PyUnicode_DecodeFSDefault(GK_PROJECT_ROOT);
	PyDict_SetItemString(globals, "project_root", v);
	Py_XDECREF(v);

	PyObject* res = PyRun_String(gk_bootstrap_code, Py_file_input, globals, globals);
	if(res == NULL) {
		PyErr_Print();
		snprintf(gk_py_err, sizeof(gk_py_err), "embedded Python: bootstrap code failed (see stderr)");
	} else {
		Py_DECREF(res);
		PyObject* err = PyDict_GetItemString(globals, "error"); /* borrowed */
		if(err != NULL && err != Py_None) {
			const char* text = PyUnicode_AsUTF8(err);
			snprintf(gk_py_err,
			         sizeof(gk_py_err),
			         "cannot load the plugin's Python code: %s",
			         text ? text : "(unprintable error)");
			PyErr_Clear();
		} else {
			gk_py_ok = 1;
		}
	}
	Py_DECREF(globals);
}

static void gk_python_start(void) {
	if(Py_IsInitialized()) {
		/* A host that already runs Python (e.g. a test harness): join it. */
		PyGILState_STATE g = PyGILState_Ensure();
		gk_python_bootstrap();
		PyGILState_Release(g);
		return;
	}
	PyConfig config;
	PyConfig_InitPythonConfig(&config);
	config.install_signal_handlers = 0; /* Falco owns SIGINT/SIGTERM/SIGHUP */
	config.parse_argv = 0;
	config.configure_c_stdio = 0;       /* leave the host's stdio buffering alone */
	config.use_environment = 0;         /* PYTHONPATH/PYTHONHOME of the host must not leak in */
	config.user_site_directory = 0;
	config.pathconfig_warnings = 0;
	const char* venv = gk_env_or("FALCO_GITLAB_VENV", GK_VENV);
	PyStatus status;
	if(venv[0] != '\0' && strcmp(venv, "none") != 0) {
		/* Present the interpreter as the venv's python: getpath then reads pyvenv.cfg and sets
		 * sys.prefix / site-packages exactly as for `<venv>/bin/python`. */
		char exe[4096];
		char versioned[32];
		snprintf(versioned, sizeof(versioned), "python%d.%d", PY_MAJOR_VERSION, PY_MINOR_VERSION);
		const char* names[] = {versioned, "python3", "python"};
		snprintf(exe, sizeof(exe), "%s/bin/%s", venv, names[0]);
		for(size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
			char candidate[4096];
			snprintf(candidate, sizeof(candidate), "%s/bin/%s", venv, names[i]);
			if(access(candidate, F_OK) == 0) {
				snprintf(exe, sizeof(exe), "%s", candidate);
				break;
			}
		}
		status = PyConfig_SetBytesString(&config, &config.executable, exe);
		if(!PyStatus_Exception(status)) {
			status = PyConfig_SetBytesString(&config, &config.program_name, exe);
		}
		if(PyStatus_Exception(status)) {
			PyConfig_Clear(&config);
			snprintf(gk_py_err, sizeof(gk_py_err), "embedded Python: cannot configure: %s",
			         status.err_msg ? status.err_msg : "?");
			return;
		}
	}
	status = Py_InitializeFromConfig(&config);
	PyConfig_Clear(&config);
	if(PyStatus_Exception(status)) {
		snprintf(gk_py_err,
		         sizeof(gk_py_err),
		         "cannot start the embedded Python interpreter (libpython %s): %s%s%s",
		         GK_LIBPYTHON,
		         status.func ? status.func : "",
		         status.func ? ": " : "",
		         status.err_msg ? status.err_msg : "unknown error");
		return;
	}
	gk_python_bootstrap();
	/* Release the GIL: every later entry takes it through PyGILState_Ensure (done by cffi). */
	PyEval_SaveThread();
}

static int gk_python_ready(void) {
	pthread_once(&gk_py_once, gk_python_start);
	return gk_py_ok;
}

/* ---- metadata: static answers, valid before init ------------------------------------------------ */

GK_EXPORT const char* plugin_get_required_api_version(void) {
	return GK_REQUIRED_API_VERSION;
}
GK_EXPORT const char* plugin_get_version(void) {
	return GK_PLUGIN_VERSION;
}
GK_EXPORT const char* plugin_get_name(void) {
	return GK_PLUGIN_NAME;
}
GK_EXPORT const char* plugin_get_description(void) {
	return GK_PLUGIN_DESCRIPTION;
}
GK_EXPORT const char* plugin_get_contact(void) {
	return GK_PLUGIN_CONTACT;
}
GK_EXPORT uint32_t plugin_get_id(void) {
	return GK_PLUGIN_ID;
}
GK_EXPORT const char* plugin_get_event_source(void) {
	return GK_EVENT_SOURCE;
}
GK_EXPORT const char* plugin_get_fields(void) {
	return GK_FIELDS_JSON;
}
GK_EXPORT const char* plugin_get_extract_event_sources(void) {
	return GK_EXTRACT_EVENT_SOURCES;
}
GK_EXPORT const char* plugin_get_init_schema(ss_plugin_schema_type* schema_type) {
	if(schema_type != NULL) {
		*schema_type = SS_PLUGIN_SCHEMA_JSON;
	}
	return GK_INIT_SCHEMA;
}

static const char* gk_fields_digest(void) {
	return GK_FIELDS_DIGEST;
}

/* ---- lifecycle ------------------------------------------------------------------------------------ */


static const struct {
	const char* name;
	ss_plugin_metric_type type;
} gk_metric_defs[GK_NMETRICS] = GK_METRIC_DEFS;

static int gk_state_ok(ss_plugin_t* s) {
	return s != NULL && ((gk_state*)s)->magic == GK_MAGIC;
}

GK_EXPORT ss_plugin_t* plugin_init(const ss_plugin_init_input* in, ss_plugin_rc* rc) {
	ss_plugin_rc dummy;
	if(rc == NULL) {
		rc = &dummy;
	}
	gk_state* s = calloc(1, sizeof(gk_state));
	if(s == NULL) {
		*rc = SS_PLUGIN_FAILURE;
		return NULL;
	}
	s->magic = GK_MAGIC;
	pthread_mutex_init(&s->lock, NULL);
	if(in != NULL) {
		s->owner = in->owner;
		s->log_fn = in->log_fn;
	}
	if(!gk_python_ready()) {
		gk_set_error(s, gk_py_err);
		gk_log(s, SS_PLUGIN_LOG_SEV_ERROR, gk_py_err);
		*rc = SS_PLUGIN_FAILURE;
		return s;
	}
	int r = gkpy_init(s, (in != NULL && in->config != NULL) ? in->config : "");
	if(!GK_PY_RAN(r)) {
		gk_set_error(s, "the plugin's Python code did not run (cffi start-up failed, see stderr)");
		*rc = SS_PLUGIN_FAILURE;
		return s;
	}
	*rc = (ss_plugin_rc)(r - GK_PY_BASE);
	return s;
}

GK_EXPORT void plugin_destroy(ss_plugin_t* sp) {
	if(!gk_state_ok(sp)) {
		return;
	}
	gk_state* s = (gk_state*)sp;
	if(s->py != NULL && gk_py_ok) {
		gkpy_destroy(s);
	}
	pthread_mutex_destroy(&s->lock);
	free(s->res_str);
	free(s->res_u64);
	free(s->res_bool);
	s->magic = 0;
	free(s);
}

GK_EXPORT const char* plugin_get_last_error(ss_plugin_t* sp) {
	if(!gk_state_ok(sp)) {
		return gk_py_ok ? "invalid plugin handle" : gk_py_err;
	}
	return ((gk_state*)sp)->lasterr;
}

/* ---- event sourcing -------------------------------------------------------------------------------- */

GK_EXPORT const char* plugin_list_open_params(ss_plugin_t* sp, ss_plugin_rc* rc) {
	(void)sp;
	if(rc != NULL) {
		*rc = SS_PLUGIN_SUCCESS;
	}
	return GK_OPEN_PARAMS;
}

GK_EXPORT ss_instance_t* plugin_open(ss_plugin_t* sp, const char* params, ss_plugin_rc* rc) {
	ss_plugin_rc dummy;
	if(rc == NULL) {
		rc = &dummy;
	}
	*rc = SS_PLUGIN_FAILURE;
	if(!gk_state_ok(sp)) {
		return NULL;
	}
	gk_state* s = (gk_state*)sp;
	if(s->py == NULL) {
		if(s->lasterr[0] == '\0') {
			gk_set_error(s, "open called on a plugin whose init failed");
		}
		return NULL;
	}
	gk_instance* h = calloc(1, sizeof(gk_instance));
	if(h == NULL) {
		gk_set_error(s, "out of memory");
		return NULL;
	}
	h->magic = GK_MAGIC;
	h->state = s;
	s->cache_valid = 0;
	int r = gkpy_open(s, h, params != NULL ? params : "");
	if(!GK_PY_RAN(r)) {
		gk_set_error(s, "the plugin's Python code did not run (see stderr)");
		free(h);
		return NULL;
	}
	*rc = (ss_plugin_rc)(r - GK_PY_BASE);
	if(*rc != SS_PLUGIN_SUCCESS) {
		free(h);
		return NULL;
	}
	pthread_mutex_lock(&s->lock);
	s->current = h;
	pthread_mutex_unlock(&s->lock);
	return h;
}

GK_EXPORT void plugin_close(ss_plugin_t* sp, ss_instance_t* hp) {
	gk_instance* h = (gk_instance*)hp;
	if(h == NULL || h->magic != GK_MAGIC) {
		return;
	}
	if(gk_state_ok(sp)) {
		gk_state* s = (gk_state*)sp;
		pthread_mutex_lock(&s->lock);
		if(s->current == h) {
			s->current = NULL;
		}
		s->cache_valid = 0;
		pthread_mutex_unlock(&s->lock);
		if(h->py != NULL) {
			gkpy_close(s, h);
		}
	}
	h->magic = 0;
	free(h);
}

GK_EXPORT ss_plugin_rc plugin_next_batch(ss_plugin_t* sp,
                                         ss_instance_t* hp,
                                         uint32_t* nevts,
                                         ss_plugin_event*** evts) {
	gk_instance* h = (gk_instance*)hp;
	if(nevts != NULL) {
		*nevts = 0;
	}
	if(!gk_state_ok(sp) || h == NULL || h->magic != GK_MAGIC || nevts == NULL || evts == NULL) {
		if(gk_state_ok(sp)) {
			gk_set_error((gk_state*)sp, "next_batch called without an open instance");
		}
		return SS_PLUGIN_FAILURE;
	}
	gk_state* s = (gk_state*)sp;
	uint32_t n = 0;
	int r = gkpy_next_batch(s, h, &n);
	if(!GK_PY_RAN(r)) {
		gk_set_error(s, "the plugin's Python code did not run (see stderr)");
		return SS_PLUGIN_FAILURE;
	}
	ss_plugin_rc rc = (ss_plugin_rc)(r - GK_PY_BASE);
	if(n > h->capacity) {
		n = h->capacity;
	}
	for(uint32_t i = 0; i < n; i++) {
		h->evts[i] = (ss_plugin_event*)(h->batch_base + h->offs[i]);
	}
	if(n > 0) {
		h->count = n;
		h->batch_end = (const char*)h->evts[n - 1] + h->evts[n - 1]->len;
	}
	*nevts = n;
	*evts = (n > 0) ? h->evts : NULL;
	if(rc == SS_PLUGIN_SUCCESS && n == 0) {
		rc = SS_PLUGIN_TIMEOUT; /* SUCCESS with no event is an error for the framework */
	}
	return rc;
}

GK_EXPORT const char* plugin_get_progress(ss_plugin_t* sp, ss_instance_t* hp, uint32_t* progress_pct) {
	gk_instance* h = (gk_instance*)hp;
	uint32_t dummy;
	if(progress_pct == NULL) {
		progress_pct = &dummy;
	}
	*progress_pct = 0;
	if(!gk_state_ok(sp) || h == NULL || h->magic != GK_MAGIC) {
		return NULL;
	}
	const char* text = NULL;
	int r = gkpy_get_progress((gk_state*)sp, h, progress_pct, &text);
	return GK_PY_RAN(r) ? text : NULL;
}

GK_EXPORT const char* plugin_event_to_string(ss_plugin_t* sp, const ss_plugin_event_input* evt);

/* ---- field extraction ------------------------------------------------------------------------------ */

/* Payload of a plugin event, or 0 when the event is not one. */
static int gk_payload(const ss_plugin_event* e, const uint8_t** data, uint32_t* len) {
	if(e == NULL || e->type != GK_PPME_PLUGINEVENT_E || e->nparams != 2 ||
	   e->len < GK_PLUGIN_EVENT_PAYLOAD_OFFSET) {
		return 0;
	}
	const uint8_t* p = (const uint8_t*)e + GK_PLUGIN_EVENT_HEADER_LEN;
	uint32_t len_id, len_payload;
	memcpy(&len_id, p, 4);
	memcpy(&len_payload, p + 4, 4);
	if(len_id != 4 || (uint64_t)len_payload + GK_PLUGIN_EVENT_PAYLOAD_OFFSET > e->len) {
		return 0;
	}
	*data = (const uint8_t*)e + GK_PLUGIN_EVENT_PAYLOAD_OFFSET;
	*len = len_payload;
	return 1;
}

/* Index of the event in the current batch when `e` is one of the events handed out by the last
 * next_batch (Python then reuses the record it decoded there), else -1. */
static int64_t gk_batch_index(gk_state* s, const ss_plugin_event* e) {
	gk_instance* h = s->current;
	if(h == NULL || h->count == 0 || h->batch_base == NULL) {
		return -1;
	}
	const char* p = (const char*)e;
	if(p < h->batch_base || p >= h->batch_end) {
		return -1;
	}
	uint32_t off = (uint32_t)(p - h->batch_base);
	uint32_t lo = 0, hi = h->count;
	while(lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		if(h->offs[mid] < off) {
			lo = mid + 1;
		} else {
			hi = mid;
		}
	}
	return (lo < h->count && h->offs[lo] == off) ? (int64_t)lo : -1;
}

static int gk_reserve_results(gk_state* s, uint32_t n) {
	if(n <= s->res_cap) {
		return 1;
	}
	uint32_t cap = n < 16 ? 16 : n;
	const char** rs = realloc(s->res_str, cap * sizeof(*rs));
	if(rs == NULL) {
		return 0;
	}
	s->res_str = rs;
	uint64_t* ru = realloc(s->res_u64, cap * sizeof(*ru));
	if(ru == NULL) {
		return 0;
	}
	s->res_u64 = ru;
	ss_plugin_bool* rb = realloc(s->res_bool, cap * sizeof(*rb));
	if(rb == NULL) {
		return 0;
	}
	s->res_bool = rb;
	s->res_cap = cap;
	return 1;
}

GK_EXPORT ss_plugin_rc plugin_extract_fields(ss_plugin_t* sp,
                                             const ss_plugin_event_input* evt,
                                             const ss_plugin_field_extract_input* in) {
	if(!gk_state_ok(sp) || evt == NULL || in == NULL || (in->num_fields > 0 && in->fields == NULL)) {
		return SS_PLUGIN_FAILURE;
	}
	gk_state* s = (gk_state*)sp;
	if(s->py == NULL) {
		gk_set_error(s, "extract_fields called on a plugin whose init failed");
		return SS_PLUGIN_FAILURE;
	}
	pthread_mutex_lock(&s->lock);
	if(!gk_reserve_results(s, in->num_fields)) {
		pthread_mutex_unlock(&s->lock);
		gk_set_error(s, "out of memory");
		return SS_PLUGIN_FAILURE;
	}
	const uint8_t* data = NULL;
	uint32_t len = 0;
	int is_ours = gk_payload(evt->evt, &data, &len);
	for(uint32_t k = 0; k < in->num_fields; k++) {
		ss_plugin_extract_field* f = &in->fields[k];
		uint32_t fid = f->field_id;
		f->res_len = 0;
		if(!is_ours || fid >= GK_NFIELDS) {
			continue;
		}
		if(gk_field_has_arg[fid]) {
			if(f->arg_key == NULL) {
				continue;
			}
			const char* out = NULL;
			int r = gkpy_extract_arg(s, evt->evtnum, data, (uint64_t)(uintptr_t)data, len,
			                         gk_batch_index(s, evt->evt), fid, f->arg_key, &out);
			if(GK_PY_RAN(r) && r == GK_PY_BASE + 1 && out != NULL) {
				s->res_str[k] = out;
				f->res.str = &s->res_str[k];
				f->res_len = 1;
			}
			continue;
		}
		if(!(s->cache_valid && s->cache_evtnum == evt->evtnum && s->cache_data == data &&
		     s->cache_len == len)) {
			s->cache_valid = 0;
			int r = gkpy_decode(s, evt->evtnum, data, (uint64_t)(uintptr_t)data, len,
			                    gk_batch_index(s, evt->evt));
			if(!GK_PY_RAN(r)) {
				continue; /* message already logged by cffi; the value stays absent */
			}
			s->cache_valid = 1;
			s->cache_evtnum = evt->evtnum;
			s->cache_data = data;
			s->cache_len = len;
		}
		int64_t off = s->cache_off[fid];
		if(off < 0) {
			continue;
		}
		switch(gk_field_types[fid]) {
		case FTYPE_STRING:
			s->res_str[k] = s->cache_blob + off;
			f->res.str = &s->res_str[k];
			break;
		case FTYPE_UINT64:
			s->res_u64[k] = s->cache_num[fid];
			f->res.u64 = &s->res_u64[k];
			break;
		case FTYPE_BOOL:
			s->res_bool[k] = s->cache_num[fid] ? 1 : 0;
			f->res.boolean = &s->res_bool[k];
			break;
		default:
			continue;
		}
		f->res_len = 1;
	}
	pthread_mutex_unlock(&s->lock);
	return SS_PLUGIN_SUCCESS;
}

GK_EXPORT const char* plugin_event_to_string(ss_plugin_t* sp, const ss_plugin_event_input* evt) {
	if(!gk_state_ok(sp) || evt == NULL || ((gk_state*)sp)->py == NULL) {
		return NULL;
	}
	const uint8_t* data = NULL;
	uint32_t len = 0;
	if(!gk_payload(evt->evt, &data, &len)) {
		return NULL;
	}
	const char* out = NULL;
	gk_state* s = (gk_state*)sp;
	/* shares the per-handle decoded event with extract_fields: same lock */
	pthread_mutex_lock(&s->lock);
	int r = gkpy_event_to_string(s, evt->evtnum, data, (uint64_t)(uintptr_t)data, len, &out);
	pthread_mutex_unlock(&s->lock);
	return GK_PY_RAN(r) ? out : NULL;
}

/* ---- metrics ------------------------------------------------------------------------------------------ */

GK_EXPORT ss_plugin_metric* plugin_get_metrics(ss_plugin_t* sp, uint32_t* num_metrics) {
	uint32_t dummy;
	if(num_metrics == NULL) {
		num_metrics = &dummy;
	}
	*num_metrics = 0;
	if(!gk_state_ok(sp)) {
		return NULL;
	}
	gk_state* s = (gk_state*)sp;
	if(s->py == NULL) {
		return NULL;
	}
	int r = gkpy_get_metrics(s, s->metric_values, GK_NMETRICS);
	if(!GK_PY_RAN(r)) {
		return NULL;
	}
	for(uint32_t i = 0; i < GK_NMETRICS; i++) {
		s->metrics[i].name = gk_metric_defs[i].name;
		s->metrics[i].type = gk_metric_defs[i].type;
		s->metrics[i].value_type = SS_PLUGIN_METRIC_VALUE_TYPE_U64;
		s->metrics[i].value.u64 = s->metric_values[i];
	}
	*num_metrics = GK_NMETRICS;
	return s->metrics;
}
