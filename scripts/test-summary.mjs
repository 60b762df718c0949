// Prints each Vitest run's counts and its slowest files (where CI's time goes), then one closing
// line "N passed, N failed" over all runs.
import { existsSync, readFileSync } from 'node:fs';
import process from 'node:process';

const print = (line) => process.stdout.write(`${line}\n`);

let passed = 0;
let failed = 0;
let skipped = 0;
for (const arg of process.argv.slice(2)) {
  const [label, file] = arg.split('=');
  if (!existsSync(file)) {
    print(`${label}: no report (the run did not finish)`);
    failed += 1;
    continue;
  }
  const report = JSON.parse(readFileSync(file, 'utf8'));
  // A file that failed before running any test (import error, hook failure) counts as one failure.
  const brokenFiles = report.testResults.filter((r) => r.status === 'failed' && r.assertionResults.length === 0).length;
  const runFailed = report.numFailedTests + brokenFiles;
  const slowest = report.testResults
    .map((r) => ({ name: r.name.replace(`${process.cwd()}/`, ''), seconds: (r.endTime - r.startTime) / 1000 }))
    .sort((a, b) => b.seconds - a.seconds)
    .slice(0, 8);
  print(`${label}, slowest files: ${slowest.map((f) => `${f.name} ${f.seconds.toFixed(0)} s`).join(', ')}`);
  print(
    `${label}: ${report.numPassedTests} passed, ${runFailed} failed, ${report.numPendingTests + report.numTodoTests} skipped`,
  );
  passed += report.numPassedTests;
  failed += runFailed;
  skipped += report.numPendingTests + report.numTodoTests;
}
print(`${passed} passed, ${failed} failed, ${skipped} skipped`);
// A run that ended without its report (vitest once ended with status 0 and no test run) fails CI as a failed test does.
if (failed > 0) process.exitCode = 1;
