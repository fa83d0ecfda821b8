// ESLint (flat config): typescript-eslint's recommended rules, the project's size limits and its line length.
// Layout is prettier's (.prettierrc.json); this file only adds what prettier does not hold.
import js from '@eslint/js';
import stylistic from '@stylistic/eslint-plugin';
import { defineConfig, globalIgnores } from 'eslint/config';
import tseslint from 'typescript-eslint';

const LINE = 160;

export default defineConfig(
  globalIgnores(['dist/', 'build/', 'node_modules/', 'bench/results/']),
  {
    files: ['**/*.ts'],
    extends: [js.configs.recommended, tseslint.configs.recommended],
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    plugins: { '@stylistic': stylistic },
    rules: {
      // prettier wraps code at 160 but leaves comments, strings and template literals as they are
      '@stylistic/max-len': ['error', { code: LINE, tabWidth: 2, ignoreUrls: false }],
      // a name dropped on purpose starts with _; so does a property left out of a ...rest copy
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrorsIgnorePattern: '^_', ignoreRestSiblings: true },
      ],
      // node:test's test() and describe() return promises that the runner itself awaits
      '@typescript-eslint/no-floating-promises': [
        'error',
        { allowForKnownSafeCalls: [{ from: 'package', package: 'node:test', name: ['test', 'it', 'describe', 'suite'] }] },
      ],
    },
  },
  {
    files: ['src/**/*.ts'],
    rules: {
      'max-lines': ['error', { max: 400, skipBlankLines: true, skipComments: true }],
      'max-lines-per-function': ['error', { max: 100, skipBlankLines: true, skipComments: true }],
    },
  },
  {
    files: ['eslint.config.js'],
    extends: [js.configs.recommended],
    plugins: { '@stylistic': stylistic },
    rules: { '@stylistic/max-len': ['error', { code: LINE }] },
  },
);
