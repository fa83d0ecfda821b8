/**
 * Imported first by livemig's own process entries: every function compiles when its module
 * loads instead of on its first call. A hand-over runs code that ran never before (pause,
 * commit, activate); compiled lazily, it paid V8's parser and bytecode generator inside the
 * guest's pause (sampled: most of the CPU of the receiver and the incoming guest there).
 * Modules imported after this one are affected; the entry imports its program dynamically.
 * Node's own functions are not: warmUpRuntime (src/warmup.ts) runs the ones a hand-over needs.
 */
import v8 from 'node:v8';
import { warmUpRuntime } from './warmup.js';

if (process.env['LIVEMIG_LAZY'] !== '1') v8.setFlagsFromString('--no-lazy');
warmUpRuntime();
