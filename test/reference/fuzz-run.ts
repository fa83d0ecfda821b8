/**
 * Runs fuzz cases (fuzz.ts) one connection each against a listener and counts what each ended
 * in, by frame type and outcome. Shared by test/fuzz.test.ts and bench/fuzz.
 */
import net from 'node:net';
import { LivemigError } from '../../src/errors.js';
import { FrameType } from '../../src/protocol/format.js';
import type { Receiver } from '../../src/receiver/listen.js';
import { fuzzCase, type Rng } from './fuzz.js';

export interface FuzzCounts {
  cases: number;
  /** outcome (an ERR_LIVEMIG_* code, or what else happened) -> count */
  outcomes: Record<string, number>;
  /** frame type -> outcome -> count */
  byType: Record<string, Record<string, number>>;
  /** anything that did not end in a LivemigError: each one a finding */
  strange: string[];
}

/** what a case ends in when its first frame was a question (ATTACH, RESOLVE) the listener answered: no migration to report */
export const ANSWERED = 'answered (ATTACH or RESOLVE: not a migration)';

export async function runFuzz(rx: Receiver, port: number, rng: Rng, cases: number): Promise<FuzzCounts> {
  const c: FuzzCounts = { cases: 0, outcomes: {}, byType: {}, strange: [] };
  const nextOutcome = (): Promise<string> =>
    rx.next().then(
      () => 'activated',
      (e: unknown) => (e instanceof LivemigError && e.code.startsWith('ERR_LIVEMIG_') ? e.code : `not a LivemigError: ${String(e)}`),
    );
  // one waiter at a time: a case the listener answers without a migration leaves it for the next
  let outcome = nextOutcome();
  for (let i = 0; i < cases; i++) {
    const k = fuzzCase(rng);
    const closed = new Promise<void>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => (k.then ? s.write(k.first) : s.end(k.first)));
      s.on('error', () => undefined); // a reset after the receiver's ERROR is one of the outcomes
      // the second frame goes once the first was answered (ACCEPT), as a source's would
      const then = k.then;
      if (then) s.once('data', () => s.end(then));
      s.resume(); // what the receiver answers is read and dropped, so that its close is seen
      s.on('close', () => resolve());
    });
    const answered = closed.then(() => new Promise<string>((r) => setTimeout(() => r(ANSWERED), 200)));
    const o = await Promise.race([outcome, answered]);
    if (o !== ANSWERED) outcome = nextOutcome();
    await closed;
    c.cases++;
    c.outcomes[o] = (c.outcomes[o] ?? 0) + 1;
    const t = `${FrameType[k.type] ?? k.type}${k.helloMutated ? '' : ' after HELLO'}`;
    const row = (c.byType[t] ??= {});
    row[o] = (row[o] ?? 0) + 1;
    if (!o.startsWith('ERR_LIVEMIG_') && o !== ANSWERED && c.strange.length < 20) c.strange.push(`${t} ${k.mutation}: ${o}`);
  }
  return c;
}
