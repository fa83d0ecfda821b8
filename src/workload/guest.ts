/** The reference guest's entry: functions compile eagerly (see src/eager.ts), then the guest loads. */
import '../eager.js';

await import('./guest-process.js');
