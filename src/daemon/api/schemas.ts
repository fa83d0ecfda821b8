/** JSON schemas of the API's bodies and answers (served in /v1/openapi.json). */

const NAME = { type: 'string', pattern: '^[A-Za-z0-9._-]{1,63}$' } as const;

export const errorBody = {
  type: 'object',
  properties: {
    error: {
      type: 'object',
      properties: {
        code: { type: 'string' },
        message: { type: 'string' },
        phase: { type: 'string' },
        field: { type: 'string', description: 'a schema error: the field at fault, e.g. to.port' },
      },
      required: ['code', 'message'],
    },
    id: { type: 'string' },
  },
  required: ['error'],
} as const;

/** POST /v1/guests: a QEMU VM registered by its QMP socket (contract guests register on the guest socket) */
export const guestRegistration = {
  type: 'object',
  additionalProperties: false,
  required: ['name', 'qemu'],
  properties: {
    name: NAME,
    qemu: {
      type: 'object',
      additionalProperties: false,
      required: ['qmp'],
      properties: {
        qmp: {
          type: 'string',
          minLength: 2,
          maxLength: 107,
          pattern: '^/',
          description: "an absolute path: the VM's QMP unix socket (-qmp unix:PATH,server=on,wait=off)",
        },
      },
    },
  },
} as const;

export const migrationRequest = {
  type: 'object',
  additionalProperties: false,
  required: ['guest', 'to'],
  properties: {
    guest: NAME,
    to: {
      type: 'object',
      additionalProperties: false,
      required: ['host', 'port'],
      properties: {
        host: { type: 'string', minLength: 1, maxLength: 253 },
        port: { type: 'integer', minimum: 1, maximum: 65535 },
        peer_name: { type: 'string', minLength: 1, maxLength: 253, description: 'the destination certificate name to expect (certificate credentials)' },
      },
    },
    mode: { type: 'string', enum: ['precopy', 'postcopy', 'hybrid'] },
    downtime_limit_ms: { type: 'number', exclusiveMinimum: 0, maximum: 60000 },
    bandwidth_mib_s: { type: 'number', exclusiveMinimum: 0, maximum: 1000000 },
    postcopy_bandwidth_mib_s: { type: 'number', exclusiveMinimum: 0, maximum: 1000000 },
    deadline_s: { type: 'number', exclusiveMinimum: 0, maximum: 86400 },
    on_stall: { type: 'string', enum: ['throttle', 'postcopy', 'force', 'abort'] },
    encodings: { type: 'boolean' },
  },
} as const;

export const migrationPatch = {
  type: 'object',
  additionalProperties: false,
  minProperties: 1,
  properties: {
    bandwidth_mib_s: { type: 'number', exclusiveMinimum: 0, maximum: 1000000 },
    postcopy_bandwidth_mib_s: { type: 'number', exclusiveMinimum: 0, maximum: 1000000 },
    downtime_limit_ms: { type: 'number', exclusiveMinimum: 0, maximum: 60000 },
  },
} as const;

export const idParams = {
  type: 'object',
  required: ['id'],
  properties: { id: { type: 'string', pattern: '^[0-9a-f-]{36}$' } },
} as const;

export const nameParams = { type: 'object', required: ['name'], properties: { name: NAME } } as const;

export const listQuery = {
  type: 'object',
  additionalProperties: false,
  properties: {
    state: { type: 'string', enum: ['queued', 'running', 'completed', 'failed', 'cancelled', 'refused'] },
    direction: { type: 'string', enum: ['outgoing', 'incoming'] },
    since: {
      type: 'string',
      // the format checks the calendar (no 2026-02-30); the pattern keeps to what Date.parse reads whole
      format: 'date-time',
      pattern: '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-2][0-9]:[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-][0-2][0-9]:[0-5][0-9])$',
      description: 'an RFC 3339 time with its offset (2026-12-06T10:00:00Z, 2026-12-06T11:00:00.5+01:00): only migrations created then or later',
    },
  },
} as const;

/** the progress event's fields (src/daemon/progress.ts ProgressView; docs/API.md, "Progress"); sizes are region bytes unless named wire */
const progress = {
  type: 'object',
  properties: {
    percent: { type: 'number', description: '0..100, never backwards; 100 only at completion' },
    eta_s: { type: 'number' },
    elapsed_ms: { type: 'number', description: 'ms since the daemon took the migration (monotonic): the sample time' },
    remaining_bytes: { type: 'number' },
    total_bytes: { type: 'number' },
    transferred_bytes: { type: 'number', description: 'region bytes sent so far, resends included' },
    wire_bytes: { type: 'number' },
    throughput_bytes_per_s: { type: 'number' },
    wire_bytes_per_s: { type: 'number' },
    dirty_bytes: { type: 'number' },
    dirty_bytes_per_s: { type: 'number' },
    expected_downtime_ms: { type: 'number' },
    postcopy: {
      type: 'object',
      properties: {
        pages_needed: { type: 'number' },
        pages_left: { type: 'number' },
        pages_pushed: { type: 'number' },
        pages_served: { type: 'number' },
        faults: { type: 'number' },
      },
    },
    disks: {
      type: 'array',
      description: "the guest's disks: each one's size and the 4 KiB blocks sent so far, resends included",
      items: { type: 'object', properties: { name: { type: 'string' }, bytes: { type: 'number' }, blocks_sent: { type: 'number' } } },
    },
  },
} as const;

/** a migration as GET shows it; `report` and `rounds` are the engine's own (QMP-like names) */
export const migrationView = {
  type: 'object',
  additionalProperties: true,
  properties: {
    id: { type: 'string' },
    direction: { type: 'string', enum: ['outgoing', 'incoming'] },
    guest: { type: 'string' },
    peer: { type: 'string' },
    state: { type: 'string', enum: ['queued', 'running', 'completed', 'failed', 'cancelled', 'refused'] },
    stage: { type: 'string' },
    progress,
    refusal: {
      type: 'object',
      description: 'an incoming source refused here: why (src/refusals.ts), where from, and its certificate name when it chains to our CA',
      properties: { reason: { type: 'string' }, from: { type: 'string' }, peer_name: { type: 'string' } },
    },
  },
} as const;
