/**
 * The wire format has two homes, src/protocol/format.ts and native/wire/format.h: this test
 * holds them to the same values, so a change in one that forgets the other fails here.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { addon } from '../src/native.js';
import * as F from '../src/protocol/format.js';
import { PAGE_SIZE } from '../src/region/region.js';

test('the addon and src/protocol/format.ts agree on every constant, frame type and page encoding', () => {
  const n = addon.wireFormat();
  assert.deepEqual(
    {
      magic: n.magic,
      headerBytes: n.headerBytes,
      protocolVersion: n.protocolVersion,
      minProtocolVersion: n.minProtocolVersion,
      maxPayload: n.maxPayload,
      flagsNone: n.flagsNone,
      flagProve: n.flagProve,
      pageSize: n.pageSize,
      maxBatchPages: n.maxBatchPages,
      pagesPrefixBytes: n.pagesPrefixBytes,
      dupBodyBytes: n.dupBodyBytes,
      maxLz4Group: n.maxLz4Group,
      stripePages: n.stripePages,
      maxChannels: n.maxChannels,
      maxFrameType: n.maxFrameType,
    },
    {
      magic: F.MAGIC,
      headerBytes: F.HEADER_BYTES,
      protocolVersion: F.PROTOCOL_VERSION,
      minProtocolVersion: F.MIN_PROTOCOL_VERSION,
      maxPayload: F.MAX_PAYLOAD,
      flagsNone: F.FLAGS_NONE,
      flagProve: F.FLAG_PROVE,
      pageSize: F.PAGE_SIZE,
      maxBatchPages: F.MAX_BATCH_PAGES,
      pagesPrefixBytes: F.PAGES_PREFIX_BYTES,
      dupBodyBytes: F.DUP_BODY_BYTES,
      maxLz4Group: F.MAX_LZ4_GROUP,
      stripePages: F.STRIPE_PAGES,
      maxChannels: F.MAX_CHANNELS,
      maxFrameType: F.MAX_FRAME_TYPE,
    },
  );
  const tsTypes = Object.fromEntries(Object.entries(F.FrameType).filter(([, v]) => typeof v === 'number'));
  assert.deepEqual(n.frameTypes, tsTypes, 'frame types');
  const tsEncodings = Object.fromEntries(Object.entries(F.PageEncoding).filter(([, v]) => typeof v === 'number'));
  assert.deepEqual(n.pageEncodings, tsEncodings, 'page encodings');
});

test('one page size: regions, the wire and the host agree (the addon loads only where pages are 4 KiB)', () => {
  assert.equal(PAGE_SIZE, F.PAGE_SIZE);
  assert.equal(addon.pageSize(), F.PAGE_SIZE, "the host's page size (sysconf)");
});
