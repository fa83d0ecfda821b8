#!/usr/bin/env node
/**
 * The `livemig` command's entry: functions compile eagerly (see src/eager.ts), then the
 * command loads.
 */
import '../eager.js';

await import('./cli.js');
