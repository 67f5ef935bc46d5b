/*
 * The part of the Falco plugin API (falcosecurity/libs, userspace/plugin/plugin_types.h and
 * plugin_api.h) that the gitlabkafka plugin and its test host use, written for this project from the
 * API's documented types and layouts.
 *
 * Layouts are those of plugin API 3.x as of 3.10.0 - 3.12.0 (Falco 0.40 - 0.44); every struct below
 * only ever grew at its end within major version 3, and the plugin only reads the members listed here.
 * The static assertions at the bottom pin the x86_64 / aarch64 (LP64) offsets, so a mistake here
 * fails the build instead of corrupting memory inside Falco.
 */
#ifndef GITLABKAFKA_PLUGIN_API_SUBSET_H
#define GITLABKAFKA_PLUGIN_API_SUBSET_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A 4-byte boolean, as encoded by the falcosecurity libs. */
typedef uint32_t ss_plugin_bool;

/* Field types of extracted values (same numbers as the libs' ppm_param_type). */
typedef enum ss_plugin_field_type {
	FTYPE_UINT64 = 8,
	FTYPE_STRING = 9,
	FTYPE_RELTIME = 20,
	FTYPE_ABSTIME = 21,
	FTYPE_BOOL = 25,
	FTYPE_IPADDR = 40,
	FTYPE_IPNET = 41,
} ss_plugin_field_type;

/* Return codes of init / open / next_batch / extract_fields. */
typedef enum ss_plugin_rc {
	SS_PLUGIN_SUCCESS = 0,
	SS_PLUGIN_FAILURE = 1,
	SS_PLUGIN_TIMEOUT = -1,
	SS_PLUGIN_EOF = 2,
	SS_PLUGIN_NOT_SUPPORTED = 3,
} ss_plugin_rc;

/* Format of the init configuration schema. */
typedef enum ss_plugin_schema_type {
	SS_PLUGIN_SCHEMA_NONE = 0,
	SS_PLUGIN_SCHEMA_JSON = 1,
} ss_plugin_schema_type;

/* Severities of the owner's log function. */
typedef enum ss_plugin_log_severity {
	SS_PLUGIN_LOG_SEV_FATAL = 1,
	SS_PLUGIN_LOG_SEV_CRITICAL = 2,
	SS_PLUGIN_LOG_SEV_ERROR = 3,
	SS_PLUGIN_LOG_SEV_WARNING = 4,
	SS_PLUGIN_LOG_SEV_NOTICE = 5,
	SS_PLUGIN_LOG_SEV_INFO = 6,
	SS_PLUGIN_LOG_SEV_DEBUG = 7,
	SS_PLUGIN_LOG_SEV_TRACE = 8,
} ss_plugin_log_severity;

/* Opaque handles. */
typedef void ss_plugin_t;
typedef void ss_instance_t;
typedef void ss_plugin_owner_t;

/*
 * Event header, packed, little-endian: the libscap event header. A plugin event (type 322,
 * PPME_PLUGINEVENT_E) follows it with two 4-byte parameter lengths (4 and N), the 4-byte plugin ID
 * and N payload bytes: len = 26 + 4 + 4 + 4 + N.
 */
#pragma pack(push, 1)
struct ss_plugin_event {
	uint64_t ts;      /* ns since the epoch; UINT64_MAX: the framework stamps "now" */
	uint64_t tid;     /* (uint64_t)-1 for plugin events */
	uint32_t len;     /* whole event, header included */
	uint16_t type;    /* 322 */
	uint32_t nparams; /* 2 */
};
#pragma pack(pop)
typedef struct ss_plugin_event ss_plugin_event;

#define GK_PPME_PLUGINEVENT_E 322
#define GK_PLUGIN_EVENT_HEADER_LEN 26
#define GK_PLUGIN_EVENT_PAYLOAD_OFFSET 38

/* An event handed to the plugin by the framework (read-only). */
typedef struct ss_plugin_event_input {
	const ss_plugin_event* evt;
	uint64_t evtnum;
	const char* evtsrc;
} ss_plugin_event_input;

typedef struct ss_plugin_byte_buffer {
	uint32_t len;
	const void* ptr;
} ss_plugin_byte_buffer;

/*
 * One field to extract. The framework fills field_id .. flist; the plugin sets res (a pointer to an
 * array of res_len values, plugin-owned, valid until the next extract_fields call) and res_len
 * (0 = the event has no value for this field).
 */
typedef struct ss_plugin_extract_field {
	union {
		const char** str;
		uint64_t* u64;
		uint32_t* u32;
		ss_plugin_bool* boolean;
		ss_plugin_byte_buffer* buf;
	} res;
	uint64_t res_len;
	uint32_t field_id;
	const char* field;
	const char* arg_key;
	uint64_t arg_index;
	ss_plugin_bool arg_present;
	uint32_t ftype;
	ss_plugin_bool flist;
} ss_plugin_extract_field;

/* Owner's logger, with the owner as first argument (its signature in every 3.x this plugin accepts). */
typedef void (*ss_plugin_log_fn_t)(ss_plugin_owner_t* o,
                                   const char* component,
                                   const char* msg,
                                   ss_plugin_log_severity sev);

/*
 * Init input. `tables` points to the state-table vtables (unused here, kept opaque); further members
 * may follow in newer API versions and are not read.
 */
typedef struct ss_plugin_init_input {
	const char* config;
	ss_plugin_owner_t* owner;
	const char* (*get_owner_last_error)(ss_plugin_owner_t* o);
	const void* tables;
	ss_plugin_log_fn_t log_fn;
} ss_plugin_init_input;

/*
 * Extraction input. table_reader is the deprecated inline reader vtable (four function pointers);
 * table_reader_ext and later members (value_offsets, ...) are not read by this plugin.
 */
typedef struct ss_plugin_field_extract_input {
	ss_plugin_owner_t* owner;
	const char* (*get_owner_last_error)(ss_plugin_owner_t* o);
	uint32_t num_fields;
	ss_plugin_extract_field* fields;
	void* table_reader[4];
	void* table_reader_ext;
	void* value_offsets;
} ss_plugin_field_extract_input;

/* Metrics. */
typedef enum ss_plugin_metric_value_type {
	SS_PLUGIN_METRIC_VALUE_TYPE_U32 = 0,
	SS_PLUGIN_METRIC_VALUE_TYPE_S32 = 1,
	SS_PLUGIN_METRIC_VALUE_TYPE_U64 = 2,
	SS_PLUGIN_METRIC_VALUE_TYPE_S64 = 3,
	SS_PLUGIN_METRIC_VALUE_TYPE_D = 4,
	SS_PLUGIN_METRIC_VALUE_TYPE_F = 5,
	SS_PLUGIN_METRIC_VALUE_TYPE_I = 6,
} ss_plugin_metric_value_type;

typedef union ss_plugin_metric_value {
	uint32_t u32;
	int32_t s32;
	uint64_t u64;
	int64_t s64;
	double d;
	float f;
	int i;
} ss_plugin_metric_value;

typedef enum ss_plugin_metric_type {
	SS_PLUGIN_METRIC_TYPE_MONOTONIC = 0,
	SS_PLUGIN_METRIC_TYPE_NON_MONOTONIC = 1,
} ss_plugin_metric_type;

typedef struct ss_plugin_metric {
	const char* name;
	ss_plugin_metric_type type;
	ss_plugin_metric_value value;
	ss_plugin_metric_value_type value_type;
} ss_plugin_metric;

/* Layout checks for LP64 targets (x86_64, aarch64). */
#if defined(__LP64__) && (defined(__GNUC__) || (__STDC_VERSION__ >= 201112L))
_Static_assert(sizeof(ss_plugin_event) == 26, "ss_plugin_event size");
_Static_assert(offsetof(ss_plugin_event, len) == 16, "ss_plugin_event.len");
_Static_assert(offsetof(ss_plugin_event, type) == 20, "ss_plugin_event.type");
_Static_assert(offsetof(ss_plugin_event, nparams) == 22, "ss_plugin_event.nparams");
_Static_assert(offsetof(ss_plugin_event_input, evtnum) == 8, "ss_plugin_event_input.evtnum");
_Static_assert(offsetof(ss_plugin_event_input, evtsrc) == 16, "ss_plugin_event_input.evtsrc");
_Static_assert(offsetof(ss_plugin_extract_field, res_len) == 8, "extract_field.res_len");
_Static_assert(offsetof(ss_plugin_extract_field, field_id) == 16, "extract_field.field_id");
_Static_assert(offsetof(ss_plugin_extract_field, field) == 24, "extract_field.field");
_Static_assert(offsetof(ss_plugin_extract_field, arg_key) == 32, "extract_field.arg_key");
_Static_assert(offsetof(ss_plugin_extract_field, arg_index) == 40, "extract_field.arg_index");
_Static_assert(offsetof(ss_plugin_extract_field, arg_present) == 48, "extract_field.arg_present");
_Static_assert(offsetof(ss_plugin_extract_field, ftype) == 52, "extract_field.ftype");
_Static_assert(offsetof(ss_plugin_extract_field, flist) == 56, "extract_field.flist");
_Static_assert(sizeof(ss_plugin_extract_field) == 64, "extract_field size");
_Static_assert(offsetof(ss_plugin_init_input, owner) == 8, "init_input.owner");
_Static_assert(offsetof(ss_plugin_init_input, tables) == 24, "init_input.tables");
_Static_assert(offsetof(ss_plugin_init_input, log_fn) == 32, "init_input.log_fn");
_Static_assert(offsetof(ss_plugin_field_extract_input, num_fields) == 16, "extract_input.num_fields");
_Static_assert(offsetof(ss_plugin_field_extract_input, fields) == 24, "extract_input.fields");
_Static_assert(offsetof(ss_plugin_field_extract_input, table_reader_ext) == 64,
               "extract_input.table_reader_ext");
_Static_assert(offsetof(ss_plugin_metric, type) == 8, "metric.type");
_Static_assert(offsetof(ss_plugin_metric, value) == 16, "metric.value");
_Static_assert(offsetof(ss_plugin_metric, value_type) == 24, "metric.value_type");
_Static_assert(sizeof(ss_plugin_metric) == 32, "metric size");
#endif

#ifdef __cplusplus
}
#endif

#endif /* GITLABKAFKA_PLUGIN_API_SUBSET_H */
