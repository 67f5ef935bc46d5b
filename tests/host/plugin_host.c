/*
 * A minimal Falco-like plugin host for the gitlabkafka plugin tests and benchmark.
 *
 * It knows nothing about Python. It loads the library the way Falco's plugin loader does
 * (dlopen RTLD_LOCAL|RTLD_NOW, one dlsym per "plugin_*" symbol), checks the required API version
 * against a 3.12.0 framework, reads every metadata function BEFORE init and parses their JSON, then
 * runs init -> list_open_params -> open -> next_batch loop (with libscap's checks on every event:
 * type 322, 2 params, plugin id, lengths; it stamps tid and "now" timestamps like libscap) ->
 * extract_fields one field at a time -> get_progress / get_metrics -> close -> destroy.
 *
 * --threads N runs N plugin handles the way Falco runs N sources: init and open in the main thread, the
 * N event loops at the same time in N threads, close and destroy back in the main thread.
 *
 * Output: one JSON object per line on stdout (meta, init, open, event, end, metrics, bench);
 * the plugin's log messages go to stderr as JSON lines ({"kind":"log",...}).
 *
 *   plugin_host --lib PATH [--config JSON] [--open PARAMS] [--field NAME]... [--all-fields]
 *               [--max-events N] [--timeout-ms MS] [--cycles N] [--reload] [--threads N]
 *               [--multi] [--progress] [--quiet] [--bench] [--no-extract] [--baseline FILE]
 *               [--repeat N] [--expect-init-failure] [--metadata-only] [--init-only]
 *
 * Exit status: 0 ok, 2 usage, 3 init failed, 4 API contract violated by the plugin, 5 next_batch
 * FAILURE, 6 open failed, 7 cannot load the library.
 */
#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "plugin_api_subset.h"

#define FRAMEWORK_API_MAJOR 3
#define FRAMEWORK_API_MINOR 12
#define FRAMEWORK_API_PATCH 0
#define MAX_FIELDS 256

/* ---- the plugin's API, resolved by name like libs' plugin_loader ------------------------------- */

typedef struct {
	void* handle;
	const char* (*get_required_api_version)(void);
	const char* (*get_version)(void);
	const char* (*get_name)(void);
	const char* (*get_description)(void);
	const char* (*get_contact)(void);
	const char* (*get_init_schema)(ss_plugin_schema_type*);
	ss_plugin_t* (*init)(const ss_plugin_init_input*, ss_plugin_rc*);
	void (*destroy)(ss_plugin_t*);
	const char* (*get_last_error)(ss_plugin_t*);
	uint32_t (*get_id)(void);
	const char* (*get_event_source)(void);
	ss_instance_t* (*open)(ss_plugin_t*, const char*, ss_plugin_rc*);
	void (*close)(ss_plugin_t*, ss_instance_t*);
	const char* (*list_open_params)(ss_plugin_t*, ss_plugin_rc*);
	const char* (*get_progress)(ss_plugin_t*, ss_instance_t*, uint32_t*);
	const char* (*event_to_string)(ss_plugin_t*, const ss_plugin_event_input*);
	ss_plugin_rc (*next_batch)(ss_plugin_t*, ss_instance_t*, uint32_t*, ss_plugin_event***);
	const char* (*get_fields)(void);
	ss_plugin_rc (*extract_fields)(ss_plugin_t*, const ss_plugin_event_input*,
	                               const ss_plugin_field_extract_input*);
	const char* (*get_extract_event_sources)(void);
	ss_plugin_metric* (*get_metrics)(ss_plugin_t*, uint32_t*);
} plugin_api;

typedef struct {
	char name[128];
	char type[16];
	int has_arg;
	uint32_t ftype;
} field_def;

typedef struct {
	uint32_t id;      /* index in get_fields */
	uint32_t ftype;
	char spec[512];   /* as given: name or name[arg] */
	char name[128];
	char arg[384];
	int has_arg;
} field_req;

/* ---- options ------------------------------------------------------------------------------------- */

static struct {
	const char* lib;
	const char* config;
	const char* open_params;
	const char* field_specs[MAX_FIELDS];
	int nfield_specs;
	int all_fields;
	long max_events;
	long timeout_ms;
	int cycles;
	int reload;
	int threads;
	int multi;
	int progress;
	int quiet;
	int bench;
	int no_extract;
	const char* baseline;
	int repeat;
	int expect_init_failure;
	int metadata_only;
	int init_only;
} opt = {.config = "{}", .open_params = "", .max_events = -1, .timeout_ms = 60000, .cycles = 1,
         .threads = 1, .repeat = 1};

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static plugin_api api;
static field_def fields[MAX_FIELDS];
static int nfields;
static field_req reqs[MAX_FIELDS];
static int nreqs;
static int owner_token; /* the owner pointer handed to the plugin is &owner_token */
static long owner_mismatch;

static double now_s(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double cpu_s(void) {
	struct timespec t;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static uint64_t wall_ns(void) {
	struct timespec t;
	clock_gettime(CLOCK_REALTIME, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void die(int code, const char* fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	pthread_mutex_lock(&out_lock);
	fprintf(stderr, "plugin_host: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	fflush(stderr);
	pthread_mutex_unlock(&out_lock);
	va_end(ap);
	exit(code);
}

/* ---- JSON output ---------------------------------------------------------------------------------- */

static void json_str(FILE* f, const char* s) {
	if(s == NULL) {
		fputs("null", f);
		return;
	}
	fputc('"', f);
	for(const unsigned char* p = (const unsigned char*)s; *p; p++) {
		switch(*p) {
		case '"': fputs("\\\"", f); break;
		case '\\': fputs("\\\\", f); break;
		case '\n': fputs("\\n", f); break;
		case '\r': fputs("\\r", f); break;
		case '\t': fputs("\\t", f); break;
		default:
			if(*p < 0x20) {
				fprintf(f, "\\u%04x", *p);
			} else {
				fputc(*p, f);
			}
		}
	}
	fputc('"', f);
}

/* ---- a small JSON parser: validates documents and reads the get_fields list ------------------- */

typedef struct {
	const char* s;
	size_t i;
	int err;
} jp;

static void jp_ws(jp* p) {
	while(p->s[p->i] == ' ' || p->s[p->i] == '\n' || p->s[p->i] == '\t' || p->s[p->i] == '\r') {
		p->i++;
	}
}

/* Parses a string; copies its (unescaped, \u kept as '?') text into out when out != NULL. */
static int jp_string(jp* p, char* out, size_t outsz) {
	size_t o = 0;
	if(p->s[p->i] != '"') {
		return p->err = 1, 0;
	}
	p->i++;
	for(;;) {
		char c = p->s[p->i];
		if(c == '\0' || (unsigned char)c < 0x20) {
			return p->err = 1, 0;
		}
		p->i++;
		if(c == '"') {
			break;
		}
		if(c == '\\') {
			char e = p->s[p->i++];
			switch(e) {
			case '"': case '\\': case '/': c = e; break;
			case 'n': c = '\n'; break;
			case 't': c = '\t'; break;
			case 'r': c = '\r'; break;
			case 'b': c = '\b'; break;
			case 'f': c = '\f'; break;
			case 'u':
				for(int k = 0; k < 4; k++) {
					char h = p->s[p->i++];
					if(!((h >= '0' && h <= '9') || (h >= 'a' && h <= 'f') || (h >= 'A' && h <= 'F'))) {
						return p->err = 1, 0;
					}
				}
				c = '?';
				break;
			default: return p->err = 1, 0;
			}
		}
		if(out != NULL && o + 1 < outsz) {
			out[o++] = c;
		}
	}
	if(out != NULL && outsz > 0) {
		out[o] = '\0';
	}
	return 1;
}

static int jp_value(jp* p, int depth);

static int jp_literal(jp* p, const char* lit) {
	size_t n = strlen(lit);
	if(strncmp(p->s + p->i, lit, n) != 0) {
		return p->err = 1, 0;
	}
	p->i += n;
	return 1;
}

static int jp_number(jp* p) {
	size_t start = p->i;
	if(p->s[p->i] == '-') {
		p->i++;
	}
	while((p->s[p->i] >= '0' && p->s[p->i] <= '9') || p->s[p->i] == '.' || p->s[p->i] == 'e' ||
	      p->s[p->i] == 'E' || p->s[p->i] == '+' || p->s[p->i] == '-') {
		p->i++;
	}
	if(p->i == start) {
		return p->err = 1, 0;
	}
	return 1;
}

/* Generic value. When `fd` is given and the value is an object, reads name/type/arg into it. */
static int jp_value_field(jp* p, int depth, field_def* fd) {
	if(depth > 64) {
		return p->err = 1, 0;
	}
	jp_ws(p);
	char c = p->s[p->i];
	if(c == '{') {
		p->i++;
		jp_ws(p);
		if(p->s[p->i] == '}') {
			p->i++;
			return 1;
		}
		for(;;) {
			char key[64];
			jp_ws(p);
			if(!jp_string(p, key, sizeof(key))) {
				return 0;
			}
			jp_ws(p);
			if(p->s[p->i++] != ':') {
				return p->err = 1, 0;
			}
			jp_ws(p);
			if(fd != NULL && strcmp(key, "name") == 0) {
				if(!jp_string(p, fd->name, sizeof(fd->name))) {
					return 0;
				}
			} else if(fd != NULL && strcmp(key, "type") == 0) {
				if(!jp_string(p, fd->type, sizeof(fd->type))) {
					return 0;
				}
			} else {
				if(fd != NULL && strcmp(key, "arg") == 0) {
					fd->has_arg = 1;
				}
				if(!jp_value(p, depth + 1)) {
					return 0;
				}
			}
			jp_ws(p);
			if(p->s[p->i] == ',') {
				p->i++;
				continue;
			}
			if(p->s[p->i] == '}') {
				p->i++;
				return 1;
			}
			return p->err = 1, 0;
		}
	}
	if(c == '[') {
		p->i++;
		jp_ws(p);
		if(p->s[p->i] == ']') {
			p->i++;
			return 1;
		}
		for(;;) {
			if(!jp_value(p, depth + 1)) {
				return 0;
			}
			jp_ws(p);
			if(p->s[p->i] == ',') {
				p->i++;
				continue;
			}
			if(p->s[p->i] == ']') {
				p->i++;
				return 1;
			}
			return p->err = 1, 0;
		}
	}
	if(c == '"') {
		return jp_string(p, NULL, 0);
	}
	if(c == 't') {
		return jp_literal(p, "true");
	}
	if(c == 'f') {
		return jp_literal(p, "false");
	}
	if(c == 'n') {
		return jp_literal(p, "null");
	}
	return jp_number(p);
}

static int jp_value(jp* p, int depth) {
	return jp_value_field(p, depth, NULL);
}

static int json_valid(const char* s, char first) {
	if(s == NULL) {
		return 0;
	}
	jp p = {s, 0, 0};
	jp_ws(&p);
	if(first && p.s[p.i] != first) {
		return 0;
	}
	if(!jp_value(&p, 0)) {
		return 0;
	}
	jp_ws(&p);
	return p.s[p.i] == '\0';
}

/* Parse get_fields as libsinsp does: a JSON array of objects with a type, a name and a desc. */
static void parse_fields(const char* json) {
	jp p = {json, 0, 0};
	nfields = 0;
	jp_ws(&p);
	if(p.s[p.i++] != '[') {
		die(4, "get_fields did not return a JSON array");
	}
	jp_ws(&p);
	if(p.s[p.i] == ']') {
		die(4, "get_fields returned no field");
	}
	for(;;) {
		if(nfields >= MAX_FIELDS) {
			die(4, "too many fields");
		}
		field_def* fd = &fields[nfields];
		memset(fd, 0, sizeof(*fd));
		jp_ws(&p);
		if(p.s[p.i] != '{' || !jp_value_field(&p, 1, fd)) {
			die(4, "get_fields: entry %d is not a valid JSON object", nfields);
		}
		if(fd->name[0] == '\0' || fd->type[0] == '\0') {
			die(4, "get_fields: entry %d has no name or type", nfields);
		}
		if(strcmp(fd->type, "string") == 0) {
			fd->ftype = FTYPE_STRING;
		} else if(strcmp(fd->type, "uint64") == 0) {
			fd->ftype = FTYPE_UINT64;
		} else if(strcmp(fd->type, "bool") == 0) {
			fd->ftype = FTYPE_BOOL;
		} else if(strcmp(fd->type, "reltime") == 0) {
			fd->ftype = FTYPE_RELTIME;
		} else if(strcmp(fd->type, "abstime") == 0) {
			fd->ftype = FTYPE_ABSTIME;
		} else {
			die(4, "get_fields: field %s has an unsupported type %s", fd->name, fd->type);
		}
		nfields++;
		jp_ws(&p);
		if(p.s[p.i] == ',') {
			p.i++;
			continue;
		}
		if(p.s[p.i] == ']') {
			p.i++;
			break;
		}
		die(4, "get_fields: malformed JSON after entry %d", nfields);
	}
	jp_ws(&p);
	if(p.s[p.i] != '\0') {
		die(4, "get_fields: trailing data after the array");
	}
}

static void resolve_requests(void) {
	nreqs = 0;
	if(opt.all_fields) {
		for(int i = 0; i < nfields && nreqs < MAX_FIELDS; i++) {
			if(fields[i].has_arg) {
				continue;
			}
			field_req* r = &reqs[nreqs++];
			memset(r, 0, sizeof(*r));
			r->id = (uint32_t)i;
			r->ftype = fields[i].ftype;
			snprintf(r->spec, sizeof(r->spec), "%.127s", fields[i].name);
			snprintf(r->name, sizeof(r->name), "%.127s", fields[i].name);
		}
	}
	for(int k = 0; k < opt.nfield_specs && nreqs < MAX_FIELDS; k++) {
		field_req* r = &reqs[nreqs];
		memset(r, 0, sizeof(*r));
		snprintf(r->spec, sizeof(r->spec), "%s", opt.field_specs[k]);
		const char* spec = opt.field_specs[k];
		const char* br = strchr(spec, '[');
		size_t nlen = br ? (size_t)(br - spec) : strlen(spec);
		if(nlen >= sizeof(r->name)) {
			die(2, "field name too long: %s", spec);
		}
		memcpy(r->name, spec, nlen);
		r->name[nlen] = '\0';
		if(br != NULL) {
			size_t alen = strlen(br + 1);
			if(alen == 0 || br[alen] != ']') {
				die(2, "bad field argument syntax: %s", spec);
			}
			snprintf(r->arg, sizeof(r->arg), "%.*s", (int)(alen - 1), br + 1);
			r->has_arg = 1;
		}
		int found = -1;
		for(int i = 0; i < nfields; i++) {
			if(strcmp(fields[i].name, r->name) == 0) {
				found = i;
				break;
			}
		}
		if(found < 0) {
			die(2, "unknown field %s (not in get_fields)", r->name);
		}
		if(fields[found].has_arg && !r->has_arg) {
			die(2, "field %s requires an argument", r->name);
		}
		r->id = (uint32_t)found;
		r->ftype = fields[found].ftype;
		nreqs++;
	}
}

/* ---- loading ---------------------------------------------------------------------------------------- */

#define SYM(s) *(void**)(&api.s) = dlsym(api.handle, "plugin_" #s)

static void load_library(void) {
	memset(&api, 0, sizeof(api));
	api.handle = dlopen(opt.lib, RTLD_LOCAL | RTLD_NOW);
	if(api.handle == NULL) {
		die(7, "dlopen(%s): %s", opt.lib, dlerror());
	}
	SYM(get_required_api_version);
	SYM(get_version);
	SYM(get_name);
	SYM(get_description);
	SYM(get_contact);
	SYM(get_init_schema);
	SYM(init);
	SYM(destroy);
	SYM(get_last_error);
	SYM(get_id);
	SYM(get_event_source);
	SYM(open);
	SYM(close);
	SYM(list_open_params);
	SYM(get_progress);
	SYM(event_to_string);
	SYM(next_batch);
	SYM(get_fields);
	SYM(extract_fields);
	SYM(get_extract_event_sources);
	SYM(get_metrics);
}

static void unload_library(void) {
	if(api.handle != NULL && dlclose(api.handle) != 0) {
		die(7, "dlclose: %s", dlerror());
	}
	api.handle = NULL;
}

/* Everything Falco does between loading a plugin and initialising it. */
static void read_metadata(int load_index) {
	if(api.get_required_api_version == NULL || api.get_version == NULL || api.get_name == NULL ||
	   api.get_description == NULL || api.get_contact == NULL || api.init == NULL ||
	   api.destroy == NULL || api.get_last_error == NULL) {
		die(4, "a required plugin symbol is missing");
	}
	const char* req = api.get_required_api_version();
	if(req == NULL) {
		die(4, "get_required_api_version returned NULL (Falco would crash)");
	}
	unsigned maj, min, pat;
	if(sscanf(req, "%u.%u.%u", &maj, &min, &pat) != 3) {
		die(4, "invalid required API version '%s'", req);
	}
	if(maj != FRAMEWORK_API_MAJOR || min > FRAMEWORK_API_MINOR ||
	   (min == FRAMEWORK_API_MINOR && pat > FRAMEWORK_API_PATCH)) {
		die(4, "required API version %s is not compatible with framework 3.12.0", req);
	}
	/* capabilities: sourcing and extraction must both be complete */
	if(!(api.get_id && api.get_event_source && api.open && api.close && api.next_batch)) {
		die(4, "event sourcing capability incomplete");
	}
	if(!(api.get_fields && api.extract_fields)) {
		die(4, "field extraction capability incomplete");
	}
	const char* name = api.get_name();
	const char* version = api.get_version();
	const char* desc = api.get_description();
	const char* contact = api.get_contact();
	uint32_t id = api.get_id();
	const char* source = api.get_event_source();
	const char* sfields = api.get_fields();
	const char* xsources = api.get_extract_event_sources ? api.get_extract_event_sources() : "[]";
	ss_plugin_schema_type schema_type = SS_PLUGIN_SCHEMA_NONE;
	const char* schema = api.get_init_schema ? api.get_init_schema(&schema_type) : NULL;
	if(!name || !version || !desc || !contact || !source || !sfields || !xsources || !schema) {
		die(4, "a metadata function returned NULL before init");
	}
	if(sscanf(version, "%u.%u.%u", &maj, &min, &pat) != 3) {
		die(4, "invalid plugin version '%s'", version);
	}
	if(id == 0 || source[0] == '\0' || strcmp(source, "syscall") == 0) {
		die(4, "invalid id/event source: %u '%s'", id, source);
	}
	if(!json_valid(sfields, '[') || !json_valid(xsources, '[') || !json_valid(schema, '{')) {
		die(4, "get_fields, get_extract_event_sources or get_init_schema is not valid JSON");
	}
	if(schema_type != SS_PLUGIN_SCHEMA_JSON) {
		die(4, "get_init_schema type %d is not JSON", (int)schema_type);
	}
	parse_fields(sfields);
	resolve_requests();
	pthread_mutex_lock(&out_lock);
	printf("{\"kind\":\"meta\",\"load\":%d,\"required_api_version\":", load_index);
	json_str(stdout, req);
	printf(",\"name\":");
	json_str(stdout, name);
	printf(",\"version\":");
	json_str(stdout, version);
	printf(",\"description\":");
	json_str(stdout, desc);
	printf(",\"contact\":");
	json_str(stdout, contact);
	printf(",\"id\":%u,\"event_source\":", id);
	json_str(stdout, source);
	printf(",\"extract_event_sources\":%s,\"init_schema_type\":%d,\"init_schema\":%s,\"fields\":%s}\n",
	       xsources, (int)schema_type, schema, sfields);
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
}

/* ---- the owner's callbacks ----------------------------------------------------------------------- */

static void host_log(ss_plugin_owner_t* o, const char* component, const char* msg, ss_plugin_log_severity sev) {
	pthread_mutex_lock(&out_lock);
	if(o != (ss_plugin_owner_t*)&owner_token) {
		owner_mismatch++;
	}
	fprintf(stderr, "{\"kind\":\"log\",\"sev\":%d,\"component\":", (int)sev);
	json_str(stderr, component);
	fprintf(stderr, ",\"msg\":");
	json_str(stderr, msg);
	fprintf(stderr, "}\n");
	fflush(stderr);
	pthread_mutex_unlock(&out_lock);
}

static const char* host_last_error(ss_plugin_owner_t* o) {
	(void)o;
	return NULL;
}

/* ---- one session: init .. destroy ---------------------------------------------------------------- */

typedef struct {
	int cycle;
	int thread;
	int status;
	long events;
	long extractions;
	long batches;
	long timeouts;
	long max_batch;
	double first_event_s;
	double end_s;
	double open_s;
	double max_idle_s;
	double first_event_cpu;
	double end_cpu;
	ss_plugin_t* st;      /* plugin handle, between session_start and session_finish */
	ss_instance_t* h;     /* open capture */
	const char* how;      /* why the loop ended */
	const char* error;
	char errbuf[1024];
} session;

static void print_value(const field_req* r, const ss_plugin_extract_field* f) {
	printf("\"");
	for(const char* c = r->spec; *c; c++) {
		if(*c == '"' || *c == '\\') {
			putchar('\\');
		}
		putchar(*c);
	}
	printf("\":");
	if(f->res_len == 0) {
		printf("null");
		return;
	}
	switch(r->ftype) {
	case FTYPE_STRING: json_str(stdout, f->res.str[0]); break;
	case FTYPE_UINT64: printf("%" PRIu64, f->res.u64[0]); break;
	case FTYPE_BOOL: printf("%s", f->res.boolean[0] ? "true" : "false"); break;
	default: printf("null");
	}
}

/* Extract the requested fields of one event; prints them unless quiet. Returns the count. */
static long extract_event(ss_plugin_t* st, const ss_plugin_event_input* ein, int print, session* se) {
	static __thread ss_plugin_extract_field fs[MAX_FIELDS];
	ss_plugin_field_extract_input in;
	memset(&in, 0, sizeof(in));
	in.owner = (ss_plugin_owner_t*)&owner_token;
	in.get_owner_last_error = host_last_error;
	long count = 0;
	for(int k = 0; k < nreqs; k++) {
		memset(&fs[k], 0, sizeof(fs[k]));
		fs[k].field_id = reqs[k].id;
		fs[k].field = reqs[k].name;
		fs[k].arg_key = reqs[k].has_arg ? reqs[k].arg : NULL;
		fs[k].arg_present = reqs[k].has_arg;
		fs[k].ftype = reqs[k].ftype;
		fs[k].flist = 0;
		fs[k].res_len = 0xdeadbeef; /* the plugin must set it */
	}
	if(opt.multi) {
		in.num_fields = (uint32_t)nreqs;
		in.fields = fs;
		if(nreqs > 0 && api.extract_fields(st, ein, &in) != SS_PLUGIN_SUCCESS) {
			die(4, "extract_fields failed: %s", api.get_last_error(st));
		}
		count = nreqs;
	} else {
		/* Falco's way: one field per call */
		for(int k = 0; k < nreqs; k++) {
			in.num_fields = 1;
			in.fields = &fs[k];
			if(api.extract_fields(st, ein, &in) != SS_PLUGIN_SUCCESS) {
				die(4, "extract_fields(%s) failed: %s", reqs[k].spec, api.get_last_error(st));
			}
			if(fs[k].res_len > 1) {
				die(4, "extract_fields(%s) returned %" PRIu64 " values for a non-list field", reqs[k].spec,
				    fs[k].res_len);
			}
			/* copy the string now: its memory is only valid until the next extract call */
			if(print && fs[k].res_len == 1 && reqs[k].ftype == FTYPE_STRING) {
				static __thread char* saved[MAX_FIELDS];
				free(saved[k]);
				saved[k] = strdup(fs[k].res.str[0]);
				static __thread const char* saved_ptr[MAX_FIELDS];
				saved_ptr[k] = saved[k];
				fs[k].res.str = &saved_ptr[k];
			}
			count++;
		}
	}
	if(print) {
		const ss_plugin_event* e = ein->evt;
		uint32_t plen;
		memcpy(&plen, (const uint8_t*)e + 30, 4);
		const char* text = api.event_to_string ? api.event_to_string(st, ein) : NULL;
		pthread_mutex_lock(&out_lock);
		printf("{\"kind\":\"event\",\"cycle\":%d,\"thread\":%d,\"evtnum\":%" PRIu64 ",\"ts\":%" PRIu64
		       ",\"len\":%u,\"payload_len\":%u,\"info\":",
		       se->cycle, se->thread, ein->evtnum, e->ts, e->len, plen);
		json_str(stdout, text);
		printf(",\"values\":{");
		for(int k = 0; k < nreqs; k++) {
			if(k) {
				putchar(',');
			}
			print_value(&reqs[k], &fs[k]);
		}
		printf("}}\n");
		fflush(stdout);
		pthread_mutex_unlock(&out_lock);
	}
	return count;
}

/* libscap's checks on a plugin event; stamps tid (and ts when the plugin asked for "now"). */
static void check_event(ss_plugin_event* e, uint32_t plugin_id) {
	if(e == NULL) {
		die(4, "next_batch returned a NULL event pointer");
	}
	if(e->type != GK_PPME_PLUGINEVENT_E || e->nparams != 2) {
		die(4, "malformed plugin event: type %u nparams %u", e->type, e->nparams);
	}
	uint8_t* p = (uint8_t*)e;
	uint32_t len_id, len_payload, id;
	memcpy(&len_id, p + 26, 4);
	memcpy(&len_payload, p + 30, 4);
	memcpy(&id, p + 34, 4);
	if(len_id != 4 || e->len != GK_PLUGIN_EVENT_PAYLOAD_OFFSET + len_payload) {
		die(4, "bad plugin event lengths: len %u, param lens %u %u", e->len, len_id, len_payload);
	}
	if(id == 0) {
		memcpy(p + 34, &plugin_id, 4);
	} else if(id != plugin_id) {
		die(4, "unexpected plugin ID in plugin event: expected %u, got %u", plugin_id, id);
	}
	e->tid = (uint64_t)-1;
	if(e->ts == UINT64_MAX) {
		e->ts = wall_ns();
	}
}

static void print_end(session* se, const char* how, const char* error) {
	pthread_mutex_lock(&out_lock);
	printf("{\"kind\":\"end\",\"cycle\":%d,\"thread\":%d,\"how\":\"%s\",\"events\":%ld,\"extractions\":%ld,"
	       "\"batches\":%ld,\"timeouts\":%ld,\"max_batch\":%ld,\"max_idle_ms\":%.1f,\"error\":",
	       se->cycle, se->thread, how, se->events, se->extractions, se->batches, se->timeouts, se->max_batch,
	       se->max_idle_s * 1000.0);
	json_str(stdout, error);
	printf("}\n");
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
}

static void print_metrics(ss_plugin_t* st, session* se) {
	if(api.get_metrics == NULL) {
		return;
	}
	uint32_t n = 0;
	ss_plugin_metric* m = api.get_metrics(st, &n);
	pthread_mutex_lock(&out_lock);
	printf("{\"kind\":\"metrics\",\"cycle\":%d,\"thread\":%d,\"values\":{", se->cycle, se->thread);
	for(uint32_t i = 0; m != NULL && i < n; i++) {
		if(i) {
			putchar(',');
		}
		json_str(stdout, m[i].name);
		putchar(':');
		switch(m[i].value_type) {
		case SS_PLUGIN_METRIC_VALUE_TYPE_U64: printf("%" PRIu64, m[i].value.u64); break;
		case SS_PLUGIN_METRIC_VALUE_TYPE_U32: printf("%u", m[i].value.u32); break;
		case SS_PLUGIN_METRIC_VALUE_TYPE_S64: printf("%" PRId64, m[i].value.s64); break;
		case SS_PLUGIN_METRIC_VALUE_TYPE_D: printf("%g", m[i].value.d); break;
		default: printf("null");
		}
	}
	printf("},\"types\":{");
	for(uint32_t i = 0; m != NULL && i < n; i++) {
		if(i) {
			putchar(',');
		}
		json_str(stdout, m[i].name);
		printf(":\"%s\"", m[i].type == SS_PLUGIN_METRIC_TYPE_MONOTONIC ? "monotonic" : "non_monotonic");
	}
	printf("}}\n");
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
}

static void print_progress(ss_plugin_t* st, ss_instance_t* h, session* se) {
	if(api.get_progress == NULL) {
		return;
	}
	uint32_t pct = 0;
	const char* text = api.get_progress(st, h, &pct);
	if(pct > 10000) {
		die(4, "get_progress returned %u > 10000", pct);
	}
	pthread_mutex_lock(&out_lock);
	printf("{\"kind\":\"progress\",\"cycle\":%d,\"thread\":%d,\"pct\":%u,\"text\":", se->cycle, se->thread,
	       pct);
	json_str(stdout, text);
	printf("}\n");
	pthread_mutex_unlock(&out_lock);
}

static ss_plugin_t* do_init(session* se, ss_plugin_rc* rc) {
	ss_plugin_init_input in;
	memset(&in, 0, sizeof(in));
	in.config = opt.config;
	in.owner = (ss_plugin_owner_t*)&owner_token;
	in.get_owner_last_error = host_last_error;
	in.tables = NULL;
	in.log_fn = host_log;
	*rc = SS_PLUGIN_FAILURE;
	ss_plugin_t* st = api.init(&in, rc);
	const char* err = (*rc != SS_PLUGIN_SUCCESS && st != NULL) ? api.get_last_error(st) : NULL;
	pthread_mutex_lock(&out_lock);
	printf("{\"kind\":\"init\",\"cycle\":%d,\"thread\":%d,\"rc\":%d,\"state\":%s,\"error\":", se->cycle,
	       se->thread, (int)*rc, st ? "true" : "false");
	json_str(stdout, err);
	printf("}\n");
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
	return st;
}

/* init, list_open_params, open: what Falco does in its main thread. Returns 1 when opened. */
static int session_start(session* se) {
	ss_plugin_rc rc;
	ss_plugin_t* st = do_init(se, &rc);
	if(rc != SS_PLUGIN_SUCCESS) {
		if(st != NULL) {
			api.destroy(st);
		}
		se->status = opt.expect_init_failure ? 0 : 3;
		return 0;
	}
	if(opt.expect_init_failure) {
		api.destroy(st);
		se->status = 1;
		return 0;
	}
	if(opt.init_only) {
		/* what `falco --list` / `falco -V` do: init, describe, destroy; never open */
		if(api.list_open_params != NULL) {
			ss_plugin_rc lrc = SS_PLUGIN_FAILURE;
			const char* params = api.list_open_params(st, &lrc);
			if(lrc != SS_PLUGIN_SUCCESS || !json_valid(params, '[')) {
				die(4, "list_open_params failed or is not a JSON array");
			}
		}
		print_metrics(st, se);
		api.destroy(st);
		return 0;
	}
	/* Falco lists the open params of a source plugin before opening it */
	if(api.list_open_params != NULL) {
		ss_plugin_rc lrc = SS_PLUGIN_FAILURE;
		const char* params = api.list_open_params(st, &lrc);
		if(lrc != SS_PLUGIN_SUCCESS || !json_valid(params, '[')) {
			die(4, "list_open_params failed or is not a JSON array");
		}
		if(se->thread == 0 && se->cycle == 0) {
			pthread_mutex_lock(&out_lock);
			printf("{\"kind\":\"open_params\",\"list\":%s}\n", params);
			fflush(stdout);
			pthread_mutex_unlock(&out_lock);
		}
	}
	ss_plugin_rc orc = SS_PLUGIN_FAILURE;
	double t_open = now_s();
	ss_instance_t* h = api.open(st, opt.open_params, &orc);
	se->open_s = now_s() - t_open;
	if(orc != SS_PLUGIN_SUCCESS) {
		const char* err = api.get_last_error(st);
		pthread_mutex_lock(&out_lock);
		printf("{\"kind\":\"open\",\"cycle\":%d,\"thread\":%d,\"rc\":%d,\"error\":", se->cycle, se->thread,
		       (int)orc);
		json_str(stdout, err);
		printf("}\n");
		fflush(stdout);
		pthread_mutex_unlock(&out_lock);
		api.destroy(st);
		se->status = 6;
		return 0;
	}
	se->st = st;
	se->h = h;
	return 1;
}

/* The event loop: what Falco runs in the source's own thread. */
static void session_loop(session* se) {
	ss_plugin_t* st = se->st;
	ss_instance_t* h = se->h;
	uint32_t plugin_id = api.get_id();
	uint64_t evtnum = 0;
	double start = now_s();
	double deadline = start + (double)opt.timeout_ms / 1000.0;
	const char* how = "deadline";
	const char* error = NULL;
	se->first_event_s = -1;
	int print = !opt.quiet && !opt.bench;
	for(;;) {
		if(now_s() > deadline) {
			how = "deadline";
			break;
		}
		uint32_t n = 0;
		ss_plugin_event** evts = NULL;
		double t0 = now_s();
		ss_plugin_rc brc = api.next_batch(st, h, &n, &evts);
		double took = now_s() - t0;
		if(brc == SS_PLUGIN_SUCCESS && n == 0) {
			die(4, "next_batch returned SUCCESS with 0 events");
		}
		if(n == 0 && brc == SS_PLUGIN_TIMEOUT) {
			if(took > se->max_idle_s) {
				se->max_idle_s = took;
			}
			if(took > 1.0) {
				die(4, "next_batch blocked %.3fs while idle", took);
			}
		}
		if(n > 0 && evts == NULL) {
			die(4, "next_batch returned %u events and a NULL array", n);
		}
		if(n > 0) {
			if(se->first_event_s < 0) {
				se->first_event_s = now_s();
				se->first_event_cpu = cpu_s();
			}
			se->batches++;
			if((long)n > se->max_batch) {
				se->max_batch = n;
			}
		}
		int stop = 0;
		for(uint32_t i = 0; i < n; i++) {
			check_event(evts[i], plugin_id);
			ss_plugin_event_input ein = {evts[i], ++evtnum, "gitlab"};
			se->events++;
			if(!opt.no_extract) {
				se->extractions += extract_event(st, &ein, print, se);
			}
			if(opt.max_events > 0 && se->events >= opt.max_events) {
				stop = 1;
				break;
			}
		}
		if(opt.progress && n > 0) {
			print_progress(st, h, se);
		}
		if(stop) {
			how = "max_events";
			break;
		}
		if(brc == SS_PLUGIN_EOF) {
			how = "eof";
			break;
		}
		if(brc == SS_PLUGIN_TIMEOUT) {
			if(n == 0) {
				se->timeouts++;
			}
			continue;
		}
		if(brc != SS_PLUGIN_SUCCESS) {
			snprintf(se->errbuf, sizeof(se->errbuf), "%s", api.get_last_error(st));
			error = se->errbuf;
			how = "failure";
			se->status = 5;
			break;
		}
	}
	se->end_s = now_s();
	se->end_cpu = cpu_s();
	se->how = how;
	se->error = error;
	if(opt.progress) {
		print_progress(st, h, se);
	}
}

/* End of capture: report, close, destroy. */
static void session_finish(session* se) {
	print_end(se, se->how, se->error);
	print_metrics(se->st, se);
	api.close(se->st, se->h);
	api.destroy(se->st);
	se->st = NULL;
	se->h = NULL;
}

static void run_session(session* se) {
	if(session_start(se)) {
		session_loop(se);
		session_finish(se);
	}
}

static void* loop_thread(void* arg) {
	session_loop((session*)arg);
	return NULL;
}

static int run_cycle(int cycle) {
	session ses[64];
	pthread_t tids[64];
	int n = opt.threads < 1 ? 1 : (opt.threads > 64 ? 64 : opt.threads);
	for(int t = 0; t < n; t++) {
		memset(&ses[t], 0, sizeof(ses[t]));
		ses[t].cycle = cycle;
		ses[t].thread = t;
	}
	if(n == 1) {
		run_session(&ses[0]);
	} else {
		/* Like Falco with several sources: init and open in the main thread, each event loop (next_batch,
		 * extract_fields, get_progress) in its own thread at the same time, close and destroy back in the
		 * main thread. */
		int started[64];
		for(int t = 0; t < n; t++) {
			started[t] = session_start(&ses[t]);
		}
		for(int t = 0; t < n; t++) {
			if(started[t] && pthread_create(&tids[t], NULL, loop_thread, &ses[t]) != 0) {
				die(2, "pthread_create failed");
			}
		}
		for(int t = 0; t < n; t++) {
			if(started[t]) {
				pthread_join(tids[t], NULL);
			}
		}
		for(int t = 0; t < n; t++) {
			if(started[t]) {
				session_finish(&ses[t]);
			}
		}
	}
	int status = 0;
	for(int t = 0; t < n; t++) {
		if(ses[t].status != 0 && status == 0) {
			status = ses[t].status;
		}
		if(opt.bench) {
			double span = ses[t].end_s - (ses[t].first_event_s > 0 ? ses[t].first_event_s : ses[t].end_s);
			double cpu = ses[t].first_event_s > 0 ? ses[t].end_cpu - ses[t].first_event_cpu : 0.0;
			printf("{\"kind\":\"bench\",\"mode\":\"kafka\",\"thread\":%d,\"events\":%ld,\"extractions\":%ld,"
			       "\"seconds\":%.6f,\"cpu_seconds\":%.6f,\"open_seconds\":%.6f,\"batches\":%ld,"
			       "\"events_per_s\":%.1f,\"extractions_per_s\":%.1f,\"events_per_cpu_s\":%.1f,"
			       "\"extractions_per_cpu_s\":%.1f}\n",
			       t, ses[t].events, ses[t].extractions, span, cpu, ses[t].open_s, ses[t].batches,
			       span > 0 ? ses[t].events / span : 0.0, span > 0 ? ses[t].extractions / span : 0.0,
			       cpu > 0 ? ses[t].events / cpu : 0.0, cpu > 0 ? ses[t].extractions / cpu : 0.0);
		}
	}
	fflush(stdout);
	return status;
}

/* ---- baseline: the same records from memory, no Kafka; only extraction goes through the plugin -- */

static int run_baseline(void) {
	FILE* f = fopen(opt.baseline, "rb");
	if(f == NULL) {
		die(2, "cannot open %s: %s", opt.baseline, strerror(errno));
	}
	size_t cap = 1 << 20, used = 0, count = 0;
	uint8_t* buf = malloc(cap);
	size_t* offs = NULL;
	size_t offs_cap = 0;
	uint32_t plugin_id = api.get_id();
	for(;;) {
		uint32_t len;
		if(fread(&len, 4, 1, f) != 1) {
			break;
		}
		while(used + GK_PLUGIN_EVENT_PAYLOAD_OFFSET + len > cap) {
			cap *= 2;
			buf = realloc(buf, cap);
		}
		if(count == offs_cap) {
			offs_cap = offs_cap ? offs_cap * 2 : 1024;
			offs = realloc(offs, offs_cap * sizeof(*offs));
		}
		uint8_t* e = buf + used;
		ss_plugin_event hdr = {UINT64_MAX, UINT64_MAX, GK_PLUGIN_EVENT_PAYLOAD_OFFSET + len,
		                       GK_PPME_PLUGINEVENT_E, 2};
		memcpy(e, &hdr, sizeof(hdr));
		uint32_t four = 4;
		memcpy(e + 26, &four, 4);
		memcpy(e + 30, &len, 4);
		memcpy(e + 34, &plugin_id, 4);
		if(fread(e + GK_PLUGIN_EVENT_PAYLOAD_OFFSET, 1, len, f) != len) {
			die(2, "truncated baseline file");
		}
		offs[count++] = used;
		used += GK_PLUGIN_EVENT_PAYLOAD_OFFSET + len;
	}
	fclose(f);
	session se = {0};
	ss_plugin_rc rc;
	ss_plugin_t* st = do_init(&se, &rc);
	if(rc != SS_PLUGIN_SUCCESS) {
		return 3;
	}
	uint64_t evtnum = 0;
	double t0 = now_s();
	double c0 = cpu_s();
	for(int r = 0; r < opt.repeat; r++) {
		for(size_t i = 0; i < count; i++) {
			ss_plugin_event_input ein = {(ss_plugin_event*)(buf + offs[i]), ++evtnum, "gitlab"};
			se.events++;
			se.extractions += extract_event(st, &ein, !opt.quiet && !opt.bench, &se);
		}
	}
	double span = now_s() - t0;
	double cpu = cpu_s() - c0;
	printf("{\"kind\":\"bench\",\"mode\":\"memory\",\"thread\":0,\"events\":%ld,\"extractions\":%ld,"
	       "\"seconds\":%.6f,\"cpu_seconds\":%.6f,\"events_per_s\":%.1f,\"extractions_per_s\":%.1f,"
	       "\"events_per_cpu_s\":%.1f,\"extractions_per_cpu_s\":%.1f}\n",
	       se.events, se.extractions, span, cpu, span > 0 ? se.events / span : 0.0,
	       span > 0 ? se.extractions / span : 0.0, cpu > 0 ? se.events / cpu : 0.0,
	       cpu > 0 ? se.extractions / cpu : 0.0);
	fflush(stdout);
	api.destroy(st);
	free(buf);
	free(offs);
	return 0;
}

/* ---- main ----------------------------------------------------------------------------------------- */

static void usage(void) {
	fprintf(stderr,
	        "usage: plugin_host --lib PATH [--config JSON] [--open PARAMS] [--field NAME]... [--all-fields]\n"
	        "       [--max-events N] [--timeout-ms MS] [--cycles N] [--reload] [--threads N] [--multi]\n"
	        "       [--progress] [--quiet] [--bench] [--no-extract] [--baseline FILE] [--repeat N]\n"
	        "       [--expect-init-failure] [--metadata-only] [--init-only]\n");
	exit(2);
}

int main(int argc, char** argv) {
	for(int i = 1; i < argc; i++) {
		const char* a = argv[i];
#define NEXT() (i + 1 < argc ? argv[++i] : (usage(), ""))
		if(strcmp(a, "--lib") == 0) {
			opt.lib = NEXT();
		} else if(strcmp(a, "--config") == 0) {
			opt.config = NEXT();
		} else if(strcmp(a, "--open") == 0) {
			opt.open_params = NEXT();
		} else if(strcmp(a, "--field") == 0) {
			if(opt.nfield_specs >= MAX_FIELDS) {
				usage();
			}
			opt.field_specs[opt.nfield_specs++] = NEXT();
		} else if(strcmp(a, "--all-fields") == 0) {
			opt.all_fields = 1;
		} else if(strcmp(a, "--max-events") == 0) {
			opt.max_events = atol(NEXT());
		} else if(strcmp(a, "--timeout-ms") == 0) {
			opt.timeout_ms = atol(NEXT());
		} else if(strcmp(a, "--cycles") == 0) {
			opt.cycles = atoi(NEXT());
		} else if(strcmp(a, "--reload") == 0) {
			opt.reload = 1;
		} else if(strcmp(a, "--threads") == 0) {
			opt.threads = atoi(NEXT());
		} else if(strcmp(a, "--multi") == 0) {
			opt.multi = 1;
		} else if(strcmp(a, "--progress") == 0) {
			opt.progress = 1;
		} else if(strcmp(a, "--quiet") == 0) {
			opt.quiet = 1;
		} else if(strcmp(a, "--bench") == 0) {
			opt.bench = 1;
		} else if(strcmp(a, "--no-extract") == 0) {
			opt.no_extract = 1;
		} else if(strcmp(a, "--baseline") == 0) {
			opt.baseline = NEXT();
		} else if(strcmp(a, "--repeat") == 0) {
			opt.repeat = atoi(NEXT());
		} else if(strcmp(a, "--expect-init-failure") == 0) {
			opt.expect_init_failure = 1;
		} else if(strcmp(a, "--metadata-only") == 0) {
			opt.metadata_only = 1;
		} else if(strcmp(a, "--init-only") == 0) {
			opt.init_only = 1;
		} else {
			usage();
		}
	}
	if(opt.lib == NULL) {
		usage();
	}
	setvbuf(stdout, NULL, _IOFBF, 1 << 16);

	load_library();
	read_metadata(0);
	if(opt.metadata_only) {
		unload_library();
		if(opt.reload) {
			load_library();
			read_metadata(1);
			unload_library();
		}
		return 0;
	}
	if(opt.baseline != NULL) {
		int status = run_baseline();
		unload_library();
		return status;
	}
	int status = 0;
	int cycle = 0;
	for(; cycle < opt.cycles; cycle++) {
		int s = run_cycle(cycle);
		if(s != 0 && status == 0) {
			status = s;
		}
	}
	if(opt.reload) {
		/* Falco may unload and reload its plugins in-process (e.g. on a config change). */
		unload_library();
		load_library();
		read_metadata(1);
		int s = run_cycle(cycle);
		if(s != 0 && status == 0) {
			status = s;
		}
	}
	unload_library();
	if(owner_mismatch > 0) {
		fprintf(stderr, "plugin_host: log_fn called with a wrong owner %ld times\n", owner_mismatch);
		return 4;
	}
	return status;
}
