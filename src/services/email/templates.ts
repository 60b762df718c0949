/** Rendered email: a subject, an HTML body and its plain-text twin. */
export interface RenderedEmail {
  subject: string;
  html: string;
  text: string;
}

const ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escapeHtml = (value: string) => value.replace(/[&<>"']/g, (c) => ESCAPES[c]!);

function layout(projectName: string, paragraphs: string[], action?: { label: string; url: string }): string {
  const body = paragraphs.map((p) => `<p>${escapeHtml(p)}</p>`).join('\n');
  const button = action
    ? `<p><a href="${escapeHtml(action.url)}" style="display:inline-block;padding:10px 18px;background:#0f172a;color:#fff;text-decoration:none;border-radius:6px">${escapeHtml(action.label)}</a></p>`
    : '';
  return `<!doctype html><html><body style="font-family:system-ui,sans-serif;color:#0f172a;max-width:560px;margin:auto">
<h2>${escapeHtml(projectName)}</h2>
${body}
${button}
</body></html>`;
}

export function resetPasswordEmail(p: { projectName: string; email: string; link: string; validHours: number }): RenderedEmail {
  const lines = [
    `Hello ${p.email},`,
    `We received a request to reset the password of your ${p.projectName} account.`,
    `The link below is valid for ${p.validHours} hours and works once. If you did not ask for it, ignore this email: your password stays as it is.`,
  ];
  return {
    subject: `${p.projectName} - Password recovery for ${p.email}`,
    html: layout(p.projectName, lines, { label: 'Reset password', url: p.link }),
    text: `${lines.join('\n\n')}\n\n${p.link}\n`,
  };
}

export function newAccountEmail(p: { projectName: string; email: string; link: string }): RenderedEmail {
  const lines = [
    `Hello ${p.email},`,
    `An account on ${p.projectName} was created for you, with the username ${p.email}.`,
    'Sign in with the password you were given, or set your own with "Forgot password".',
  ];
  return {
    subject: `${p.projectName} - New account for ${p.email}`,
    html: layout(p.projectName, lines, { label: 'Go to the dashboard', url: p.link }),
    text: `${lines.join('\n\n')}\n\n${p.link}\n`,
  };
}
