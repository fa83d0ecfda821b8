/**
 * A request that fails its route's schema, said in words a caller can act on: which field
 * (`to.port`, `surprise`), what is wrong with it, and what is allowed where the schema says so
 * cheaply (the fields of that object, the values of an enum). fastify hands ajv's first error
 * (allErrors is off): its instancePath, keyword and params, and the schema path it failed at.
 */
import type { FastifyError, FastifyRequest } from 'fastify';

interface AjvError {
  instancePath: string;
  schemaPath: string;
  keyword: string;
  params: Record<string, unknown>;
  message?: string;
}

type Schema = { properties?: Record<string, unknown>; [k: string]: unknown };

/** what a caller's value looks like in a message: JSON, cut short (it is the caller's own, echoed) */
function shown(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 64 ? `${text.slice(0, 61)}...` : text;
}

/** The schema object the failing keyword belongs to: the schema path without its keyword. */
function schemaAt(root: unknown, schemaPath: string): Schema | undefined {
  const steps = schemaPath.replace(/^#\/?/, '').split('/').filter(Boolean).slice(0, -1);
  let node: unknown = root;
  for (const step of steps) {
    if (node === null || typeof node !== 'object') return undefined;
    node = (node as Record<string, unknown>)[step.replace(/~1/g, '/').replace(/~0/g, '~')];
  }
  return node !== null && typeof node === 'object' ? (node as Schema) : undefined;
}

/** The value at a JSON pointer in what the caller sent. */
function valueAt(root: unknown, pointer: string): unknown {
  let node = root;
  for (const step of pointer.split('/').filter(Boolean)) {
    if (node === null || typeof node !== 'object') return undefined;
    node = (node as Record<string, unknown>)[step.replace(/~1/g, '/').replace(/~0/g, '~')];
  }
  return node;
}

/** the parts of a request whose values a message may show (never a header: one carries the token) */
const SHOWN: Record<string, (req: FastifyRequest) => unknown> = {
  body: (req) => req.body,
  params: (req) => req.params,
  querystring: (req) => req.query,
};

export function describeValidation(err: FastifyError, req: FastifyRequest): { message: string; field?: string } {
  const first = (err.validation as AjvError[] | undefined)?.[0];
  const part = err.validationContext ?? 'body';
  if (!first) return { message: err.message };
  const at = first.instancePath
    .split('/')
    .filter(Boolean)
    .map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'))
    .join('.');
  const inside = (name: string): string => (at ? `${at}.${name}` : name);
  const where = at ? `in ${at}` : `in the ${part}`;
  const schema = schemaAt((req.routeOptions.schema as Record<string, unknown> | undefined)?.[part], first.schemaPath);
  const fields = Object.keys(schema?.properties ?? {});
  const of = SHOWN[part];
  const got = of ? `, got ${shown(valueAt(of(req), first.instancePath))}` : '';
  switch (first.keyword) {
    case 'additionalProperties': {
      const field = inside(String(first.params['additionalProperty']));
      return { field, message: `${part}: unknown field '${field}'${fields.length ? ` (allowed ${where}: ${fields.join(', ')})` : ''}` };
    }
    case 'required': {
      const field = inside(String(first.params['missingProperty']));
      return { field, message: `${part}: field '${field}' is required` };
    }
    case 'minProperties':
      return { ...(at ? { field: at } : {}), message: `${part}: ${at ? `'${at}' ` : ''}needs at least one of ${fields.join(', ')}` };
    case 'enum': {
      const allowed = (first.params['allowedValues'] as unknown[] | undefined)?.map(String) ?? [];
      return { field: at, message: `${part}: '${at}' must be one of ${allowed.join(', ')}${got}` };
    }
    case 'format':
    case 'pattern':
      // a value of a given form: the schema's description says which, better than a pattern would
      if (typeof schema?.['description'] === 'string') return { field: at, message: `${part}: '${at}' must be ${schema['description']}${got}` };
    // falls through
    default:
      return { ...(at ? { field: at } : {}), message: `${part}: ${at ? `'${at}' ` : ''}${first.message ?? 'is not valid'}${got}` };
  }
}
